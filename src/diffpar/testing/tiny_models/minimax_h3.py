"""Tiny MiniMax-H3 transformer (one packed sequence of text, video and audio rows), its cases and real config."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("minimax_h3")
def _minimax_h3(heads=4, head_dim=16, layers=2, refiner_layers=1):
    from diffusers import MiniMaxH3Transformer3DModel

    hidden = heads * head_dim
    model = construct(
        MiniMaxH3Transformer3DModel, num_attention_heads=heads, attention_head_dim=head_dim, hidden_size=hidden,
        num_layers=layers, num_refiner_layers=refiner_layers, ffn_dim=96, in_channels=4, audio_in_channels=8,
        patch_size=(1, 2, 2), text_dim=24, freq_dim=32, time_embed_hidden_dim=48, time_embed_dim=32,
        rope_freq_dim=head_dim // 8,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        # Packed rows: [text, video (1 frame x 1 row x seq columns, the first column a clean conditioning row at
        # timestep 0), audio]. Audio rows make text + audio even, so the packed length has seq's parity.
        g = torch.Generator().manual_seed(seed)
        audio = 4 if text % 2 == 0 else 3
        total = text + seq + audio
        tags = torch.cat([torch.ones(text), torch.zeros(seq), torch.full((audio,), 2.0)]).long()
        timestep_indices = torch.ones(total, dtype=torch.long)  # row -> index in `timestep`
        timestep_indices[text] = 0  # the conditioning video row
        positions = torch.zeros(total, 3)
        positions[:text, 0] = torch.arange(text)
        positions[text:text + seq, 2] = torch.arange(seq)
        positions[text + seq:, 0] = torch.arange(audio)
        return dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            audio_hidden_states=torch.randn(batch, audio, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
            timestep=torch.tensor([0.0, 0.5]),
            timestep_indices=timestep_indices,
            token_tags=tags,
            position_ids=positions.long(),
            video_indices=torch.arange(text, text + seq),
            audio_indices=torch.arange(text + seq, total),
            text_indices=torch.arange(text),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("minimax_h3", "MiniMaxH3Transformer3DModel", kind="video", notes="one packed text/video/audio sequence"),
]

REAL_CONFIGS = {
    "MiniMax-H3": ("MiniMaxH3Transformer3DModel", dict(
        num_attention_heads=56, attention_head_dim=128, hidden_size=5376, num_layers=50, num_refiner_layers=2,
        ffn_dim=14336, in_channels=24, audio_in_channels=32, patch_size=(1, 2, 2), text_dim=5120, freq_dim=256,
        time_embed_hidden_dim=5376, time_embed_dim=2688, rope_freq_dim=16)),
}
