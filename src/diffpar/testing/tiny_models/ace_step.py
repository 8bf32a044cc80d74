"""ACE-Step 1.5 (`AceStepTransformer1DModel`): tiny seeded builder, harness case, real configuration.

`seq` is the number of tokens: `2 * seq - 1` latent frames (odd), padded to the patch size 2 by the forward and
patchified to `seq` tokens. Layer 0 uses a sliding window of 4 tokens (so the band cuts across every shard
boundary at these lengths), layer 1 full attention. ACE-Step at 25 latent frames a second: a 4-minute song is
6000 frames, 3000 tokens.
"""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("ace_step")
def _ace_step(heads=2, kv_heads=None, head_dim=8, layers=2, sliding_window=4):
    from diffusers import AceStepTransformer1DModel

    model = construct(
        AceStepTransformer1DModel,
        hidden_size=heads * head_dim, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, head_dim=head_dim, in_channels=12, audio_acoustic_hidden_dim=4,
        patch_size=2, sliding_window=sliding_window, encoder_hidden_size=10,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        g = torch.Generator().manual_seed(seed)
        frames = 2 * seq - 1
        return dict(
            hidden_states=torch.randn(batch, frames, 4, generator=g),
            timestep=torch.full((batch,), 0.7),
            timestep_r=torch.full((batch,), 0.4),
            encoder_hidden_states=torch.randn(batch, text, 10, generator=g),
            context_latents=torch.randn(batch, frames, 8, generator=g),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("ace_step", "AceStepTransformer1DModel", kind="audio", model_kwargs={"heads": 8, "kv_heads": 4},
              notes="sliding-window layers: keys gathered, band rows local; full layers split; cross-attention local"),
]

REAL_CONFIGS = {
    "ACE-Step 1.5": ("AceStepTransformer1DModel", dict(
        hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, in_channels=192, audio_acoustic_hidden_dim=64, patch_size=2,
        sliding_window=128)),
}
