"""Stable Audio 3 (`StableAudio3DiTModel`): tiny seeded builder, harness case, real configuration.

`seq` is the number of tokens: 2 memory tokens plus `seq - 2` audio latent frames (odd `seq`: odd frames and odd
tokens). Stable Audio 3 at 47 s: 507 latent frames + 64 memory tokens = 571 tokens.
"""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

MEMORY_TOKENS = 2


@builder("stable_audio3")
def _stable_audio3(heads=2, head_dim=8, layers=2, differential=True):
    from diffusers import StableAudio3DiTModel

    model = construct(
        StableAudio3DiTModel,
        io_channels=4, patch_size=1, embed_dim=heads * head_dim, depth=layers, num_heads=heads, cond_token_dim=12,
        global_cond_dim=10, local_add_cond_dim=5, timestep_features_dim=8, ff_mult=2.0,
        num_memory_tokens=MEMORY_TOKENS, use_differential_attention=differential,
    )
    with torch.no_grad():  # zero-initialised (loaded from the checkpoint): seeded values so every path matters
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d) or module is not model and hasattr(module, "to_local_embed"):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape) * 0.1)
        model.prompt_padding_embedding.copy_(torch.randn(model.prompt_padding_embedding.shape))

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0, inpaint=False):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, text, dtype=torch.bool)
        if text_padding:
            mask[:, text - text_padding:] = False
        return dict(
            hidden_states=torch.randn(batch, 4, seq - MEMORY_TOKENS, generator=g),
            timestep=torch.full((batch,), 0.5),
            encoder_hidden_states=torch.randn(batch, text, 12, generator=g),
            global_hidden_states=torch.randn(batch, 10, generator=g),
            encoder_attention_mask=mask,
            # Inpainting: one row per audio frame (mask + masked latents), as StableAudio3InpaintPipeline passes.
            local_add_cond=torch.randn(batch, 5, seq - MEMORY_TOKENS, generator=g) if inpaint else None,
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("stable_audio3", "StableAudio3DiTModel", kind="audio", input_kwargs={"text_padding": 2, "inpaint": True},
              notes="64 memory tokens + frames; differential attention; cross-attention local; inpainting rows per shard"),
]

REAL_CONFIGS = {
    "Stable Audio 3": ("StableAudio3DiTModel", dict(
        io_channels=256, patch_size=1, embed_dim=1536, depth=24, num_heads=24, cond_token_dim=768,
        global_cond_dim=768, local_add_cond_dim=257, timestep_features_dim=256, ff_mult=4.0, num_memory_tokens=64,
        use_differential_attention=True)),
}
