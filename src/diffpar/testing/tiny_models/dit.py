"""DiT (`DiTTransformer2DModel`): tiny seeded builder, harness case, real configuration."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


def square_side(tokens: int) -> int:
    """DiT only takes square latents: the side whose square is nearest `tokens` with the same parity (16 -> 4,
    15 -> 3, 17 -> 5), so an odd request still gives an odd token count."""
    side = round(tokens ** 0.5)
    if (side * side) % 2 != tokens % 2:
        side += -1 if tokens < side * side else 1
    return side


@builder("dit")
def _dit(heads=2, head_dim=8, layers=2):
    from diffusers import DiTTransformer2DModel

    model = construct(
        DiTTransformer2DModel,
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero",
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        # DiT has no prompt (class labels instead): `text` is unused.
        g = torch.Generator().manual_seed(seed)
        side = square_side(seq)
        return dict(
            hidden_states=torch.randn(batch, 4, 2 * side, 2 * side, generator=g),
            timestep=torch.full((batch,), 500, dtype=torch.long),
            class_labels=torch.arange(batch) % 10,
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("dit", "DiTTransformer2DModel",
              notes="square latents only: odd layouts use 9 and 25 tokens; class-conditional, no prompt"),
]

REAL_CONFIGS = {
    "DiT-XL-2-256": ("DiTTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")),
}
