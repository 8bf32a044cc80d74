"""Tiny SANA-Video transformer (refused: convolutional feed-forward over the token grid, linear attention)."""
from __future__ import annotations

import torch

from diffpar.families.transformers.sana_video import REFUSAL
from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("sana_video")
def _sana_video(heads=2, head_dim=16, layers=1):
    from diffusers import SanaVideoTransformer3DModel

    model = construct(
        SanaVideoTransformer3DModel,
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_cross_attention_heads=heads, cross_attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
        caption_channels=16, mlp_ratio=2.0, sample_size=8, patch_size=(1, 2, 2), rope_max_seq_len=64,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 1, 2, 2 * seq, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            timestep=torch.full((batch,), 500.0),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("sana_video", "SanaVideoTransformer3DModel", kind="video", cp=(), tp=(), refused=REFUSAL,
              notes="refused: convolutional feed-forward over the token grid, linear attention"),
]

REAL_CONFIGS = {}  # refused for tensor parallelism: no per-rank bytes
