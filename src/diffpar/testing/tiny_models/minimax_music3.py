"""MiniMax Music 3 (`MiniMaxMusic3Transformer1DModel`): tiny seeded builder, harness case, real configuration.

`seq` is the number of tokens: one timestep token plus `seq - 1` latent frames (odd `seq`: an odd token count).
The pipeline denoises fixed windows of 200 language-model frames, about 689 latent frames (8 s at 86 latents a
second): 690 tokens per call, whatever the song's length.
"""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("minimax_music3")
def _minimax_music3(heads=2, head_dim=8, layers=2):
    from diffusers import MiniMaxMusic3Transformer1DModel

    model = construct(
        MiniMaxMusic3Transformer1DModel,
        in_channels=4, condition_dim=6, num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
        ff_inner_dim=24, rotary_dim=4, fourier_embedding_dim=8,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        # No prompt: the conditioning is frame-aligned (one vector per latent frame); `text` is unused.
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, seq - 1, generator=g),
            timestep=torch.full((batch,), 0.5),
            encoder_hidden_states=torch.randn(batch, seq - 1, 6, generator=g),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("minimax_music3", "MiniMaxMusic3Transformer1DModel", kind="audio",
              notes="1 timestep token + frames; frame-aligned conditioning, no prompt attention"),
]

REAL_CONFIGS = {
    "MiniMax Music 3": ("MiniMaxMusic3Transformer1DModel", dict(
        in_channels=128, condition_dim=2048, num_layers=36, num_attention_heads=32, attention_head_dim=64,
        ff_inner_dim=8192, rotary_dim=32, fourier_embedding_dim=256)),
}
