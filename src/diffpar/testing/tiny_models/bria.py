"""Tiny Bria (`BriaTransformer2DModel`) and Bria FIBO (`BriaFiboTransformer2DModel`): FLUX.1's blocks; FIBO adds one
text-encoder layer per block and a key mask for prompts of different lengths."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_models.longcat_image import flux_like_inputs
from diffpar.testing.tiny_transformers import builder, construct, rope_axes


@builder("bria")
def _bria(heads=2, head_dim=16, layers=1, single_layers=1):
    from diffusers import BriaTransformer2DModel

    model = construct(
        BriaTransformer2DModel,
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        axes_dims_rope=list(rope_axes(head_dim)),
    )
    return model, flux_like_inputs(16, 32)


@builder("bria_fibo")
def _bria_fibo(heads=2, head_dim=16, layers=1, single_layers=1):
    from diffusers import BriaFiboTransformer2DModel

    model = construct(
        BriaFiboTransformer2DModel,
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        axes_dims_rope=list(rope_axes(head_dim)), text_encoder_dim=24,
    )
    blocks = layers + single_layers
    base = flux_like_inputs(16, 32)

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0):
        # text_padding: the last prompt tokens of the first sample are padding, masked as keys (the pipeline's
        # mask when prompts in one batch differ in length).
        kwargs = base(seq=seq, text=text, batch=batch, seed=seed)
        g = torch.Generator().manual_seed(seed + 1)
        kwargs["text_encoder_layers"] = [torch.randn(batch, text, 24, generator=g) for _ in range(blocks)]
        if text_padding:
            mask = torch.ones(batch, text + seq, dtype=torch.bool)
            mask[0, text - text_padding:text] = False
            kwargs["joint_attention_kwargs"] = {"attention_mask": mask[:, None, None, :]}
        return kwargs

    return model, inputs


CASES = [
    ModelCase("bria", "BriaTransformer2DModel", notes="FLUX.1's split and blocks"),
    ModelCase("bria_fibo", "BriaFiboTransformer2DModel",
              notes="per-block text-encoder layers split with the prompt; key mask reordered for Ulysses"),
]

REAL_CONFIGS = {
    "Bria (diffusers class defaults, 11.9B; Bria 3.2 is 4B)": ("BriaTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=[16, 56, 56])),
    "Bria FIBO": ("BriaFiboTransformer2DModel", dict(
        patch_size=1, in_channels=48, num_layers=8, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=[16, 56, 56], rope_theta=10000,
        time_theta=10000, text_encoder_dim=2048)),
}
