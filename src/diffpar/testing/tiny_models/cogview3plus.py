"""CogView3-Plus (`CogView3PlusTransformer2DModel`): tiny seeded builder, harness case, real configuration."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_models.pixart import grid
from diffpar.testing.tiny_transformers import builder, construct


def cogview_inputs(seq=16, text=8, batch=1, seed=1):
    """A CogView3-Plus / CogView4 call: seq image tokens (2 x 2 patches on a rows x cols grid, inside CogView3-Plus'
    20 x 20 positional table; CogView4 makes its RoPE pair from the grid) and the size conditions."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = grid(seq)
    size = torch.tensor([[16.0 * rows, 16.0 * cols]] * batch)
    return dict(
        hidden_states=torch.randn(batch, 4, 2 * rows, 2 * cols, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
        timestep=torch.full((batch,), 500, dtype=torch.long),
        original_size=size, target_size=size, crop_coords=torch.zeros(batch, 2),
        return_dict=False,
    )


@builder("cogview3plus")
def _cogview3plus(heads=2, head_dim=8, layers=2):
    from diffusers import CogView3PlusTransformer2DModel

    model = construct(
        CogView3PlusTransformer2DModel,
        patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
        out_channels=4, text_embed_dim=16, time_embed_dim=16, condition_dim=4, pos_embed_max_size=20, sample_size=8,
    )

    return model, cogview_inputs


CASES = [
    ModelCase("cogview3plus", "CogView3PlusTransformer2DModel",
              notes="text and image split entering the first block; joint attention without mask or RoPE"),
]

REAL_CONFIGS = {
    "CogView3-Plus-3B": ("CogView3PlusTransformer2DModel", dict(
        patch_size=2, in_channels=16, num_layers=30, attention_head_dim=40, num_attention_heads=64,
        out_channels=16, text_embed_dim=4096, time_embed_dim=512, condition_dim=256, pos_embed_max_size=128,
        sample_size=128)),
}
