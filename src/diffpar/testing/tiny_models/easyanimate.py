"""Tiny EasyAnimate transformer: MMDiT blocks followed by a plain joint block, RoPE on the video part."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("easyanimate")
def _easyanimate(heads=2, head_dim=16, layers=2, mmdit_layers=1):
    from diffusers import EasyAnimateTransformer3DModel

    model = construct(
        EasyAnimateTransformer3DModel,
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, patch_size=2,
        sample_width=16, sample_height=16, num_layers=layers, mmdit_layers=mmdit_layers, time_embed_dim=16,
        text_embed_dim=16, text_embed_dim_t5=12, after_norm=False,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        # One latent frame of 2 x 2*seq pixels: seq video tokens with 2x2 patches. Prompt: text - 3 tokens of the
        # main text encoder and 3 of T5, concatenated by the forward.
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 1, 2, 2 * seq, generator=g),
            timestep=torch.full((batch,), 500, dtype=torch.long),
            encoder_hidden_states=torch.randn(batch, text - 3, 16, generator=g),
            encoder_hidden_states_t5=torch.randn(batch, 3, 12, generator=g),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("easyanimate", "EasyAnimateTransformer3DModel", kind="video", pipelines=("EasyAnimatePipeline",),
              notes="MMDiT and plain joint blocks; RoPE split as it leaves rope_embedding"),
]

REAL_CONFIGS = {
    "EasyAnimateV5.1-12b": ("EasyAnimateTransformer3DModel", dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, patch_size=2,
        sample_width=84, sample_height=84, num_layers=48, mmdit_layers=48, time_embed_dim=512,
        text_embed_dim=3584, text_embed_dim_t5=None, after_norm=False, add_norm_text_encoder=False)),
}
