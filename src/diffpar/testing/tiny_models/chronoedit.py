"""Tiny ChronoEdit transformer (Wan 2.1 image-to-video blocks, with the image context), its cases and real config."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("chronoedit")
def _chronoedit(heads=4, head_dim=12, layers=2):
    from diffusers import ChronoEditTransformer3DModel

    inner = heads * head_dim
    model = construct(
        ChronoEditTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, image_dim=24,
        added_kv_proj_dim=inner, rope_max_seq_len=64,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, image_tokens=5):
        # Video tokens = frames * (H/2) * (W/2) with 1 frame, H = 2: W = 2 * seq (any seq, odd included).
        # The image context (CLIP features, 257 tokens in the real pipeline) joins the prompt; both stay whole.
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 1, 2, 2 * seq, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            encoder_hidden_states_image=torch.randn(batch, image_tokens, 24, generator=g),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("chronoedit", "ChronoEditTransformer3DModel", kind="video", notes="diffusers' plan; Wan's TP plan"),
]

REAL_CONFIGS = {
    "ChronoEdit-14B": ("ChronoEditTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", image_dim=1280, added_kv_proj_dim=5120)),
}
