"""Cosmos 3 (`Cosmos3OmniTransformer`, a packed dual-pathway text/vision decoder): tiny seeded builder, harness
case, real configuration.

The forward takes one packed joint sequence (no batch dimension): `text` prompt tokens first (the causal
"understanding" prefix), then the vision patches of one latent (the "generation" tokens, `seq` of them on a
rows x cols patch grid, one frame, every frame noisy), with 3-axis mRoPE positions.
"""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


def grid(tokens: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == tokens, as square as the count allows (16 -> 4 x 4, 15 -> 3 x 5)."""
    rows = max(r for r in range(1, int(tokens ** 0.5) + 1) if tokens % r == 0)
    return rows, tokens // rows


_CHANNELS, _PATCH, _VOCAB = 4, 2, 64


@builder("cosmos3")
def _cosmos3(heads=4, head_dim=16, layers=2, kv_heads=2):
    from diffusers import Cosmos3OmniTransformer

    model = construct(
        Cosmos3OmniTransformer,
        head_dim=head_dim, hidden_size=heads * head_dim, intermediate_size=64, latent_channel=_CHANNELS,
        latent_patch_size=_PATCH, num_attention_heads=heads, num_hidden_layers=layers, num_key_value_heads=kv_heads,
        patch_latent_dim=_PATCH * _PATCH * _CHANNELS, vocab_size=_VOCAB, rope_axes_dim=(4, 2, 2),
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        # batch: the packed forward takes one joint sequence (the pipeline calls it once per CFG pass).
        g = torch.Generator().manual_seed(seed)
        rows, cols = grid(seq)
        total = text + seq
        text_pos = torch.arange(text)
        row_pos, col_pos = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        vision_pos = torch.stack([torch.full((seq,), text), text + row_pos.flatten(), text + col_pos.flatten()])
        position_ids = torch.cat([text_pos.expand(3, text), vision_pos], dim=1)
        vision_indexes = torch.arange(text, total)
        return dict(
            input_ids=torch.randint(0, _VOCAB, (text,), generator=g),
            text_indexes=torch.arange(text),
            position_ids=position_ids,
            und_len=text,
            sequence_length=total,
            vision_tokens=[torch.randn(1, _CHANNELS, 1, _PATCH * rows, _PATCH * cols, generator=g)],
            vision_token_shapes=[(1, rows, cols)],
            vision_sequence_indexes=vision_indexes,
            vision_mse_loss_indexes=vision_indexes,
            vision_timesteps=torch.full((seq,), 500.0),
            vision_noisy_frame_indexes=[torch.tensor([0])],
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("cosmos3", "Cosmos3OmniTransformer", kind="video", model_kwargs={"heads": 8, "kv_heads": 4},
              notes="vision tokens split; the causal text prefix whole on every rank, its keys shared out for the "
                    "vision pathway"),
]

# Cosmos3OmniTransformer's defaults (the 8B dense Qwen3 backbone).
REAL_CONFIGS = {
    "Cosmos-3 Omni (defaults)": ("Cosmos3OmniTransformer", dict(
        head_dim=128, hidden_size=4096, intermediate_size=12288, latent_channel=48, latent_patch_size=2,
        num_attention_heads=32, num_hidden_layers=36, num_key_value_heads=8, patch_latent_dim=192,
        vocab_size=151936)),
}
