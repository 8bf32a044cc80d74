"""CogView4 (`CogView4Transformer2DModel`): tiny seeded builder, harness case, real configuration."""
from __future__ import annotations

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_models.cogview3plus import cogview_inputs
from diffpar.testing.tiny_transformers import builder, construct


@builder("cogview4")
def _cogview4(heads=2, head_dim=8, layers=2):
    from diffusers import CogView4Transformer2DModel

    model = construct(
        CogView4Transformer2DModel,
        patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, text_embed_dim=16, time_embed_dim=16, condition_dim=4, sample_size=8,
        rope_axes_dim=(16, 16),
    )

    return model, cogview_inputs


CASES = [
    ModelCase("cogview4", "CogView4Transformer2DModel",
              notes="text and image split after patch_embed, RoPE pair at every block"),
]

REAL_CONFIGS = {
    "CogView4-6B": ("CogView4Transformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=28, attention_head_dim=128, num_attention_heads=32,
        text_embed_dim=4096, time_embed_dim=512, condition_dim=256, pos_embed_max_size=128, sample_size=128,
        rope_axes_dim=(256, 256))),
}
