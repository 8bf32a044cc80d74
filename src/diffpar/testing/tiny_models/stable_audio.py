"""Stable Audio Open (`StableAudioDiTModel`): tiny seeded builder, harness case, real configuration.

`seq` is the number of tokens: one global token plus `seq - 1` audio latent frames (so an odd `seq` gives an odd
token count, the length the *_anything layouts must split unevenly). Stable Audio Open 1.0 at 47 s: 1024 latent
frames, 1025 tokens.
"""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("stable_audio")
def _stable_audio(heads=2, kv_heads=None, head_dim=8, layers=2):
    from diffusers import StableAudioDiTModel

    model = construct(
        StableAudioDiTModel,
        sample_size=16, in_channels=4, num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
        num_key_value_attention_heads=kv_heads or heads, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
        global_states_input_dim=12, cross_attention_input_dim=10,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        g = torch.Generator().manual_seed(seed)
        # As the pipeline builds it: rotary over head_dim // 2 channels, for the global token and every frame.
        rotary = get_1d_rotary_pos_embed(head_dim // 2, seq, use_real=True, repeat_interleave_real=False)
        return dict(
            hidden_states=torch.randn(batch, 4, seq - 1, generator=g),
            timestep=torch.full((batch,), 0.5),
            encoder_hidden_states=torch.randn(batch, text, 10, generator=g),
            global_hidden_states=torch.randn(batch, 1, 12, generator=g),
            rotary_embedding=rotary,
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("stable_audio", "StableAudioDiTModel", kind="audio", model_kwargs={"heads": 8, "kv_heads": 4},
              pipelines=(), notes="1 global token + frames; cross-attention (GQA) to the whole prompt local"),
]

REAL_CONFIGS = {
    "stable-audio-open-1.0": ("StableAudioDiTModel", dict(
        sample_size=1024, in_channels=64, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        num_key_value_attention_heads=12, out_channels=64, cross_attention_dim=768, time_proj_dim=256,
        global_states_input_dim=1536, cross_attention_input_dim=768)),
}
