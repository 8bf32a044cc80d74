"""Tiny Motif-Video transformer: dual-stream then single-stream blocks (the last one a decoder block), text
cross-attention in the dual blocks, first-frame image embeddings prepended to the prompt."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("motif_video_cross_single")  # the same model with text cross-attention in the encoder single blocks too
@builder("motif_video_padded")  # the same model, called with a right-padded prompt and its mask
@builder("motif_video")
def _motif_video(heads=2, head_dim=16, layers=1, single_layers=2, decoder_layers=1, cross_single=False,
                 padded=False):
    from diffusers import MotifVideoTransformer3DModel

    t = head_dim // 4 // 2 * 2
    h = (head_dim - t) // 2 // 2 * 2
    model = construct(
        MotifVideoTransformer3DModel,
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_single_layers=single_layers, num_decoder_layers=decoder_layers, mlp_ratio=2.0, patch_size=2,
        patch_size_t=1, text_embed_dim=16, image_embed_dim=8, rope_axes_dim=(t, h, head_dim - t - h),
        enable_text_cross_attention_dual=True, enable_text_cross_attention_single=cross_single,
    )
    pad = padded

    def inputs(seq=16, text=8, batch=1, seed=1, image=4, padded=pad):
        # One latent frame of 2 x 2*seq pixels: seq video tokens with 2x2 patches; `image` first-frame image
        # embedding tokens prepended to the `text` prompt tokens (0: none; 4 keeps the text stream divisible where the
        # prompt length is).
        g = torch.Generator().manual_seed(seed)
        kwargs = dict(
            hidden_states=torch.randn(batch, 4, 1, 2, 2 * seq, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            return_dict=True,
        )
        if image:
            kwargs["image_embeds"] = torch.randn(batch, image, 8, generator=g)
        if padded:  # the last quarter of the prompt is padding
            mask = torch.ones(batch, text, dtype=torch.long)
            mask[:, text - max(1, text // 4):] = 0
            kwargs["encoder_attention_mask"] = mask
        return kwargs

    return model, inputs


CASES = [
    ModelCase("motif_video", "MotifVideoTransformer3DModel", kind="video",
              notes="text cross-attention gathers the prompt; decoder blocks split their restart copy"),
    # A padded prompt: its mask is laid out for Ulysses' key order; Ring and *_anything refuse it at the call.
    ModelCase("motif_video_padded", "MotifVideoTransformer3DModel", kind="video",
              cp=("w2-ulysses", "w4-ulysses"), tp=("w2-tp",), model_kwargs={"heads": 4, "padded": True},
              notes="padded prompt mask: U tested; R and *_anything refused"),
    ModelCase("motif_video_cross_single", "MotifVideoTransformer3DModel", kind="video",
              cp=("w2-ulysses", "w4-ulysses2xring2", "w4-ring-anything-odd"), tp=(),
              model_kwargs={"heads": 4, "cross_single": True},
              notes="cross-attention in single blocks: CP only (TP refused, see tests/test_families_k6_motif.py)"),
]

REAL_CONFIGS = {
    # The class defaults (the released layout: 20 dual + 40 single blocks of 24 heads of 128).
    "Motif-Video": ("MotifVideoTransformer3DModel", dict(
        in_channels=33, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_decoder_layers=0, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
        text_embed_dim=4096, rope_axes_dim=(16, 56, 56))),
}
