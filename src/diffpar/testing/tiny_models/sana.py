"""Sana (`SanaTransformer2DModel`): tiny seeded builder, harness case, real configuration."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_models.pixart import grid
from diffpar.testing.tiny_transformers import builder, construct, prompt_mask


@builder("sana")
def _sana(heads=2, head_dim=8, layers=2, qk_norm=None):
    from diffusers import SanaTransformer2DModel

    model = construct(
        SanaTransformer2DModel,
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_cross_attention_heads=heads, cross_attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
        caption_channels=16, sample_size=8, patch_size=1, interpolation_scale=1, qk_norm=qk_norm,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0):
        # seq image tokens (1 x 1 patches on a rows x cols grid: 16 -> 4 x 4, so 4 ranks hold one row each and
        # the feed-forward's halo spans two ranks); text_padding masks the prompt's last tokens.
        g = torch.Generator().manual_seed(seed)
        rows, cols = grid(seq)
        mask = prompt_mask(batch, text, text_padding, dtype=torch.long)
        return dict(
            hidden_states=torch.randn(batch, 4, rows, cols, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            encoder_attention_mask=mask,
            timestep=torch.full((batch,), 500, dtype=torch.long),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("sana", "SanaTransformer2DModel", model_kwargs={"heads": 4, "qk_norm": "rms_norm_across_heads"},
              input_kwargs={"text_padding": 3},
              notes="linear attention: one all-reduce of key-value summaries; feed-forward conv: halo exchange; "
                    "TP: attention only (the convolutional feed-forward stays whole)"),
]

REAL_CONFIGS = {
    "Sana-1600M-1024px": ("SanaTransformer2DModel", dict(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
        num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
        mlp_ratio=2.5, sample_size=32, patch_size=1)),
}
