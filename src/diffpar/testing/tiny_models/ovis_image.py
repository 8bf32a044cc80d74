"""Tiny Ovis-Image (`OvisImageTransformer2DModel`): FLUX.1's blocks with SwiGLU feed-forwards."""
from __future__ import annotations

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_models.longcat_image import flux_like_inputs
from diffpar.testing.tiny_transformers import builder, construct, rope_axes


@builder("ovis_image")
def _ovis_image(heads=2, head_dim=16, layers=1, single_layers=1):
    from diffusers import OvisImageTransformer2DModel

    model = construct(
        OvisImageTransformer2DModel,
        patch_size=1, in_channels=16, out_channels=16, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        axes_dims_rope=rope_axes(head_dim),
    )
    return model, flux_like_inputs(16, 32)


CASES = [ModelCase("ovis_image", "OvisImageTransformer2DModel", notes="FLUX.1's split; gated MLPs split by halves")]

REAL_CONFIGS = {
    "Ovis-Image": ("OvisImageTransformer2DModel", dict(
        patch_size=1, in_channels=64, out_channels=64, num_layers=6, num_single_layers=27, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=2048, axes_dims_rope=(16, 56, 56))),
}
