"""Tiny Chroma (`ChromaTransformer2DModel`): FLUX.1's blocks with one modulation MLP and a prompt-padding mask."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct, rope_axes


@builder("chroma")
def _chroma(heads=2, head_dim=16, layers=1, single_layers=1):
    from diffusers import ChromaTransformer2DModel

    model = construct(
        ChromaTransformer2DModel,
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        axes_dims_rope=rope_axes(head_dim), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=2,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0):
        # The pipeline's mask: 1 over the prompt's tokens and one padding token, 0 over the rest of the padding,
        # then 1 over every image token (a float mask: diffusers adds it to the attention logits).
        g = torch.Generator().manual_seed(seed)
        text_mask = torch.ones(batch, text)
        if text_padding:
            text_mask[:, text - text_padding + 1:] = 0
        return dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            timestep=torch.full((batch,), 0.5),
            img_ids=torch.randn(seq, 3, generator=g),
            txt_ids=torch.zeros(text, 3),
            attention_mask=torch.cat([text_mask, torch.ones(batch, seq)], dim=1),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("chroma", "ChromaTransformer2DModel",
              notes="prompt-padding mask reordered for Ulysses; ring refuses a padded prompt"),
]

REAL_CONFIGS = {
    "Chroma1-HD": ("ChromaTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56),
        approximator_num_channels=64, approximator_hidden_dim=5120, approximator_layers=5)),
}
