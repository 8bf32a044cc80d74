"""Tiny Qwen-Image 2.1 (`QwenImage21Transformer2DModel`): one block-causal sequence of text (with condition-image
slots) and the target image."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

_TOKENS_PER_SLOT = 4  # each image slot of the vision-language encoder stands for a 2x2 group of latent tokens


@builder("qwenimage21")
def _qwenimage21(heads=2, head_dim=16, layers=2):
    from diffusers import QwenImage21Transformer2DModel

    model = construct(
        QwenImage21Transformer2DModel,
        patch_size=1, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, context_in_dim=32, mlp_ratio=3, axes_dims_rope=(4, 6, 6),
    )

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0):
        # The target image has 4 * ceil(seq / 4) tokens (a whole number of encoder slots), laid out 2 rows high.
        g = torch.Generator().manual_seed(seed)
        slots = max(2, -(-seq // _TOKENS_PER_SLOT))
        slots += slots % 2
        target = slots * _TOKENS_PER_SLOT
        text_mask = torch.ones(batch, text, dtype=torch.bool)
        if text_padding:
            text_mask[:, text - text_padding:] = False
        return dict(
            hidden_states=torch.randn(batch, target, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            timestep=torch.full((batch,), 0.5),
            img_shapes=[[(1, 2, target // 2)]] * batch,
            img_mask=torch.cat([torch.zeros(batch, text, dtype=torch.bool),
                                torch.ones(batch, slots, dtype=torch.bool)], dim=1),
            encoder_hidden_states_mask=text_mask,
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("qwenimage21", "QwenImage21Transformer2DModel", cp=("w2-ulysses", "w4-ulysses", "w2-ulysses-anything-odd"),
              notes="Ulysses only (block-causal attention run whole per head group); ring refused"),
]

REAL_CONFIGS = {
    "Qwen-Image-2.1": ("QwenImage21Transformer2DModel", dict(
        patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
        num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=(16, 56, 56))),
}
