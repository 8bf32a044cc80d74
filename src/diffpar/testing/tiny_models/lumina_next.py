"""Lumina-Next (`LuminaNextDiT2DModel`): tiny seeded builder, harness case, real configuration."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_models.pixart import grid
from diffpar.testing.tiny_transformers import builder, construct, prompt_mask


@builder("lumina_next")
def _lumina_next(heads=2, kv_heads=None, head_dim=8, layers=2):
    from diffusers import LuminaNextDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    model = construct(
        LuminaNextDiT2DModel,
        sample_size=16, patch_size=2, in_channels=4, hidden_size=heads * head_dim, num_layers=layers,
        num_attention_heads=heads, num_kv_heads=kv_heads or heads, multiple_of=16, norm_eps=1e-5,
        learn_sigma=True, qk_norm=True, cross_attention_dim=32, scaling_factor=1.0,
    )
    with torch.no_grad():  # created uninitialized (torch.empty); the checkpoint fills it
        model.pad_token.normal_()

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0, base_sequence_length=16):
        # seq image tokens (2 x 2 patches, rows x cols grid); the pipeline's whole RoPE table and its
        # "proportional attention" (base_sequence_length); text_padding masks the prompt's last tokens.
        g = torch.Generator().manual_seed(seed)
        rows, cols = grid(seq)
        mask = prompt_mask(batch, text, text_padding, dtype=torch.long)
        return dict(
            hidden_states=torch.randn(batch, 4, 2 * rows, 2 * cols, generator=g),
            timestep=torch.full((batch,), 0.5),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            encoder_mask=mask,
            image_rotary_emb=get_2d_rotary_pos_embed_lumina(head_dim, 32, 32),
            cross_attention_kwargs={"base_sequence_length": base_sequence_length} if base_sequence_length else {},
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("lumina_next", "LuminaNextDiT2DModel", model_kwargs={"heads": 4, "kv_heads": 2},
              input_kwargs={"text_padding": 3},
              notes="self-attention split (proportional scale from the whole length); cross-attention local; "
                    "TP: LayerNorm across heads sharded, per-head gate sliced"),
]

REAL_CONFIGS = {
    "Lumina-Next-SFT": ("LuminaNextDiT2DModel", dict(
        sample_size=128, patch_size=2, in_channels=4, hidden_size=2304, num_layers=24, num_attention_heads=32,
        num_kv_heads=8, multiple_of=256, norm_eps=1e-5, learn_sigma=True, qk_norm=True, cross_attention_dim=2048,
        scaling_factor=1.0)),
}
