"""Tiny FLUX.3 (`Flux3Transformer2DModel`): per-stream blocks (image, reference image, text), then joint blocks."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("flux3")
def _flux3(heads=2, head_dim=16, layers=1, single_layers=1):
    from diffusers import Flux3Transformer2DModel

    model = construct(
        Flux3Transformer2DModel,
        in_channels=16, cond_in_channels=8, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32, timestep_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    )

    def inputs(seq=16, text=8, batch=1, seed=1, reference=True):
        # reference=True adds reference-image tokens (image-to-image), as many as the image's.
        g = torch.Generator().manual_seed(seed)
        kwargs = dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            timestep=torch.full((batch,), 0.5),
            img_ids=torch.randn(seq, 4, generator=g),
            txt_ids=torch.randn(text, 4, generator=g),
            return_dict=False,
        )
        if reference:
            kwargs.update(image_cond_hidden_states=torch.randn(batch, seq, 8, generator=g),
                          image_cond_ids=torch.randn(seq, 4, generator=g))
        return kwargs

    return model, inputs


CASES = [
    ModelCase("flux3", "Flux3Transformer2DModel",
              notes="per-stream blocks and per-token modulation split with the tokens; reference image included"),
]

REAL_CONFIGS = {
    "FLUX.3": ("Flux3Transformer2DModel", dict(
        in_channels=128, cond_in_channels=128, num_layers=5, num_single_layers=28, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=20480, timestep_channels=256, mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32))),
}
