"""Lumina-Image 2.0 (`Lumina2Transformer2DModel`): tiny seeded builder, harness case, real configuration."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_models.pixart import grid
from diffpar.testing.tiny_transformers import builder, construct, prompt_mask


@builder("lumina2")
def _lumina2(heads=2, kv_heads=None, head_dim=8, layers=2, refiner_layers=1):
    from diffusers import Lumina2Transformer2DModel

    model = construct(
        Lumina2Transformer2DModel,
        sample_size=16, patch_size=2, in_channels=4, hidden_size=heads * head_dim, num_layers=layers,
        num_refiner_layers=refiner_layers, num_attention_heads=heads, num_kv_heads=kv_heads or heads,
        multiple_of=16, norm_eps=1e-5, axes_dim_rope=(head_dim // 2, head_dim // 4, head_dim // 4),
        axes_lens=(64, 64, 64), cap_feat_dim=8,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0):
        # seq image tokens (2 x 2 patches on a rows x cols grid); text_padding masks the prompt's last tokens, as
        # the pipeline's tokenizer pads (the context refiner masks them, the joint sequence drops them).
        g = torch.Generator().manual_seed(seed)
        rows, cols = grid(seq)
        mask = prompt_mask(batch, text, text_padding, dtype=torch.long)
        return dict(
            hidden_states=torch.randn(batch, 4, 2 * rows, 2 * cols, generator=g),
            timestep=torch.full((batch,), 0.5),
            encoder_hidden_states=torch.randn(batch, text, 8, generator=g),
            encoder_attention_mask=mask,
            return_dict=False,
        )

    return model, inputs


CASES = [
    # 4 of the prompt's tokens are padding: the joint sequences (real prompt + image tokens: 20, 18, 20) then
    # divide as the even layouts (Ulysses x Ring) need.
    # Grouped key/value heads (4 query, 2 key/value) as the real model has (24, 8); at w4-tp each key/value head is
    # held by the two ranks computing its query heads.
    ModelCase("lumina2", "Lumina2Transformer2DModel", model_kwargs={"heads": 4, "kv_heads": 2},
              input_kwargs={"text_padding": 4},
              notes="noise refiner and joint layers split; the context refiner runs whole on every rank"),
]

REAL_CONFIGS = {
    "Lumina-Image-2.0": ("Lumina2Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, hidden_size=2304, num_layers=26, num_refiner_layers=2,
        num_attention_heads=24, num_kv_heads=8, multiple_of=256, norm_eps=1e-5, axes_dim_rope=(32, 32, 32),
        axes_lens=(300, 512, 512), cap_feat_dim=2304)),
}
