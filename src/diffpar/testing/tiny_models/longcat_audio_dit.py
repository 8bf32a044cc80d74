"""LongCat AudioDiT (`LongCatAudioDiTTransformer`): tiny seeded builder, harness case, real configuration.

`seq` is the number of latent frames, which is the token count (no extra tokens). The pipeline caps a clip at
30 s: 351 frames (24 kHz, 2048x autoencoder).
"""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("longcat_audio_dit")
def _longcat_audio_dit(heads=2, head_dim=8, layers=2, adaln_type="global"):
    from diffusers import LongCatAudioDiTTransformer

    model = construct(
        LongCatAudioDiTTransformer,
        dit_dim=heads * head_dim, dit_depth=layers, dit_heads=heads, dit_text_dim=12, latent_dim=4,
        adaln_type=adaln_type, qk_norm=True, text_conv=True, long_skip=True, use_latent_condition=True, ff_mult=2.0,
    )
    with torch.no_grad():  # zero-initialised (AdaLN, output, GRN; loaded from the checkpoint): seeded values
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape) * 0.1)

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0):
        g = torch.Generator().manual_seed(seed)
        text_mask = torch.ones(batch, text, dtype=torch.bool)
        if text_padding:
            text_mask[:, text - text_padding:] = False
        return dict(
            hidden_states=torch.randn(batch, seq, 4, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 12, generator=g),
            encoder_attention_mask=text_mask,
            timestep=torch.full((batch,), 0.5),
            attention_mask=torch.ones(batch, seq, dtype=torch.bool),  # as the pipeline passes it
            latent_cond=torch.randn(batch, seq, 4, generator=g),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("longcat_audio_dit", "LongCatAudioDiTTransformer", kind="audio", input_kwargs={"text_padding": 3},
              notes="frames only; RoPE and frame mask rows taken per shard; cross-attention to the padded prompt local"),
]

REAL_CONFIGS = {
    "LongCat-AudioDiT": ("LongCatAudioDiTTransformer", dict(
        dit_dim=1536, dit_depth=24, dit_heads=24, dit_text_dim=768, latent_dim=64, adaln_type="global",
        adaln_use_text_cond=True, long_skip=True, text_conv=True, qk_norm=True, use_latent_condition=True)),
}
