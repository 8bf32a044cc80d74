"""AuraFlow (`AuraFlowTransformer2DModel`): tiny seeded builder, harness case, real configuration."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_models.pixart import grid
from diffpar.testing.tiny_transformers import builder, construct


@builder("auraflow")
def _auraflow(heads=2, head_dim=8, layers=1, single_layers=2):
    from diffusers import AuraFlowTransformer2DModel

    model = construct(
        AuraFlowTransformer2DModel,
        sample_size=32, patch_size=2, in_channels=4, num_mmdit_layers=layers, num_single_dit_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        caption_projection_dim=heads * head_dim, out_channels=4, pos_embed_max_size=400,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        # seq image tokens (2 x 2 patches on a rows x cols grid, inside the 20 x 20 positional table); the model
        # prepends 8 register tokens to the text tokens.
        g = torch.Generator().manual_seed(seed)
        rows, cols = grid(seq)
        return dict(
            hidden_states=torch.randn(batch, 4, 2 * rows, 2 * cols, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            timestep=torch.full((batch,), 0.5),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("auraflow", "AuraFlowTransformer2DModel",
              notes="image split after pos_embed, prompt + register tokens at the first joint block"),
]

REAL_CONFIGS = {
    "AuraFlow-v0.3": ("AuraFlowTransformer2DModel", dict(
        sample_size=64, patch_size=2, in_channels=4, num_mmdit_layers=4, num_single_dit_layers=32,
        attention_head_dim=256, num_attention_heads=12, joint_attention_dim=2048, caption_projection_dim=3072,
        out_channels=4, pos_embed_max_size=9216)),
}
