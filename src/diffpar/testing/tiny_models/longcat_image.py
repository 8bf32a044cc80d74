"""Tiny LongCat-Image (`LongCatImageTransformer2DModel`): FLUX.1's blocks, no pooled projection."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct, rope_axes


def flux_like_inputs(in_channels: int, text_dim: int, **extra):
    """Inputs of a FLUX.1-style forward: tokens, 2-D position ids (text ids zero, as the pipelines pass them)."""

    def inputs(seq=16, text=8, batch=1, seed=1):
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, seq, in_channels, generator=g),
            encoder_hidden_states=torch.randn(batch, text, text_dim, generator=g),
            timestep=torch.full((batch,), 0.5),
            img_ids=torch.randn(seq, 3, generator=g),
            txt_ids=torch.zeros(text, 3),
            return_dict=False,
            **{k: v(batch) for k, v in extra.items()},
        )

    return inputs


@builder("longcat_image")
def _longcat_image(heads=2, head_dim=16, layers=1, single_layers=1):
    from diffusers import LongCatImageTransformer2DModel

    model = construct(
        LongCatImageTransformer2DModel,
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=list(rope_axes(head_dim)),
    )
    return model, flux_like_inputs(16, 32)


CASES = [ModelCase("longcat_image", "LongCatImageTransformer2DModel", notes="FLUX.1's split and blocks")]

REAL_CONFIGS = {
    "LongCat-Image (diffusers class defaults, 11.9B; the released checkpoint is smaller)": ("LongCatImageTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3584, pooled_projection_dim=3584, axes_dims_rope=[16, 56, 56])),
}
