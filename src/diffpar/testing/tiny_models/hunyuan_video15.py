"""Tiny HunyuanVideo 1.5 and HunyuanVideo Framepack transformers."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _rope_axes(head_dim):
    first = head_dim // 4 // 2 * 2
    second = (head_dim - first) // 2 // 2 * 2
    return (first, second, head_dim - first - second)


@builder("hunyuan_video15")
def _hunyuan_video15(heads=2, head_dim=16, layers=2, refiner_layers=1):
    from diffusers import HunyuanVideo15Transformer3DModel

    model = construct(
        HunyuanVideo15Transformer3DModel,
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_refiner_layers=refiner_layers, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
        text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=_rope_axes(head_dim), task_type="i2v",
    )

    def inputs(seq=16, text=8, batch=1, seed=1, valid=None, image=True):
        # Video: 1 frame x 1 row x seq columns (patch 1). Text: 1 image token (zero image embeds: text-to-video,
        # its token masked out), 2 ByT5 tokens and text - 3 MLLM tokens; `valid`: real MLLM tokens per row,
        # right-padded as the tokenizer pads them.
        g = _gen(seed)
        mllm = text - 3
        valid = valid or [mllm] * batch
        mask = torch.zeros(batch, mllm, dtype=torch.long)
        for row, n in enumerate(valid):
            mask[row, :n] = 1
        image_embeds = torch.randn(batch, 1, 12, generator=g) if image else torch.zeros(batch, 1, 12)
        return dict(
            hidden_states=torch.randn(batch, 4, 1, 1, seq, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, mllm, 16, generator=g),
            encoder_attention_mask=mask,
            encoder_hidden_states_2=torch.randn(batch, 2, 8, generator=g),
            encoder_attention_mask_2=torch.ones(batch, 2, dtype=torch.long),
            image_embeds=image_embeds,
            return_dict=False,
        )

    return model, inputs


@builder("hunyuan_video_framepack")
def _hunyuan_video_framepack(heads=2, head_dim=16, layers=1, single_layers=1, refiner_layers=1):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = construct(
        HunyuanVideoFramepackTransformer3DModel,
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=refiner_layers, patch_size=2, patch_size_t=1,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=_rope_axes(head_dim), guidance_embeds=True,
        has_image_proj=True, image_proj_dim=12, has_clean_x_embedder=True,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, valid=None):
        # seq video tokens of one 2x2 patch each, packed as the pipeline does: seq - 3 noisy frames, then the
        # history the forward requires: 1 clean frame, 2 frames pooled 2x and 4 frames pooled 4x (one token each).
        # Prompt: 1 image-projection token + text - 1 text tokens (`valid`: real ones per row, right-padded).
        g = _gen(seed)
        frames = seq - 3
        words = text - 1
        valid = valid or [words] * batch
        mask = torch.zeros(batch, words, dtype=torch.long)
        for row, n in enumerate(valid):
            mask[row, :n] = 1
        return dict(
            hidden_states=torch.randn(batch, 4, frames, 2, 2, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, words, 16, generator=g),
            encoder_attention_mask=mask,
            pooled_projections=torch.randn(batch, 8, generator=g),
            image_embeds=torch.randn(batch, 1, 12, generator=g),
            indices_latents=torch.arange(8, 8 + frames),
            latents_clean=torch.randn(batch, 4, 1, 2, 2, generator=g),
            indices_latents_clean=torch.tensor([0]),
            latents_history_2x=torch.randn(batch, 4, 2, 2, 2, generator=g),
            indices_latents_history_2x=torch.tensor([1, 2]),
            latents_history_4x=torch.randn(batch, 4, 4, 2, 2, generator=g),
            indices_latents_history_4x=torch.tensor([3, 4, 5, 6]),
            guidance=torch.full((batch,), 6000.0),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("hunyuan_video15", "HunyuanVideo15Transformer3DModel", kind="video",
              pipelines=("HunyuanVideo15Pipeline",),
              notes="packed [image, ByT5, MLLM] text with padding cut before the split; key mask in Ulysses order"),
    ModelCase("hunyuan_video_framepack", "HunyuanVideoFramepackTransformer3DModel", kind="video",
              pipelines=("HunyuanVideoFramepackPipeline",),
              notes="history tokens packed in the forward: split at the first block, last block's video gathered"),
]

REAL_CONFIGS = {
    "HunyuanVideo-1.5-480p": ("HunyuanVideo15Transformer3DModel", dict(
        in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
        num_refiner_layers=2, patch_size=1, patch_size_t=1, text_embed_dim=3584, text_embed_2_dim=1472,
        image_embed_dim=1152, rope_axes_dim=(16, 56, 56))),
    "FramePackI2V_HY": ("HunyuanVideoFramepackTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, patch_size=2, patch_size_t=1, text_embed_dim=4096,
        pooled_projection_dim=768, rope_axes_dim=(16, 56, 56), guidance_embeds=True, has_image_proj=True,
        image_proj_dim=1152, has_clean_x_embedder=True)),
}
