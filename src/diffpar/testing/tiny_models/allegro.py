"""Tiny Allegro transformer: self-attention with per-token RoPE positions, cross-attention to the prompt."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("allegro")
def _allegro(heads=2, head_dim=12, layers=2):
    from diffusers import AllegroTransformer3DModel

    model = construct(
        AllegroTransformer3DModel,
        patch_size=2, patch_size_t=1, num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, num_layers=layers, cross_attention_dim=heads * head_dim, sample_height=8, sample_width=8,
        sample_frames=8, caption_channels=16,
    )
    axis = head_dim // 3  # RoPE: a third of each head per axis (t, h, w)

    def inputs(seq=16, text=8, batch=1, seed=1, prompt_padding=0):
        # One latent frame of 2 x 2*seq pixels: seq video tokens with 2x2 patches. RoPE as the pipeline passes it:
        # (cos, sin) tables per axis and each token's (t, h, w) position.
        g = torch.Generator().manual_seed(seed)
        tables = tuple((torch.randn(rows, axis, generator=g), torch.randn(rows, axis, generator=g))
                       for rows in (4, 4, seq))
        positions = (torch.zeros(1, seq, dtype=torch.long), torch.zeros(1, seq, dtype=torch.long),
                     torch.arange(seq).reshape(1, seq))
        prompt_mask = torch.ones(batch, text, dtype=torch.long)
        if prompt_padding:
            prompt_mask[:, text - prompt_padding:] = 0
        return dict(
            hidden_states=torch.randn(batch, 4, 1, 2, 2 * seq, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_attention_mask=prompt_mask,
            image_rotary_emb=(tables, positions),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("allegro", "AllegroTransformer3DModel", kind="video", pipelines=("AllegroPipeline",),
              notes="RoPE positions cut per rank inside attention; cross-attention and its prompt mask local"),
]

REAL_CONFIGS = {
    "Allegro": ("AllegroTransformer3DModel", dict(
        patch_size=2, patch_size_t=1, num_attention_heads=24, attention_head_dim=96, in_channels=4, out_channels=4,
        num_layers=32, cross_attention_dim=2304, sample_height=90, sample_width=160, sample_frames=22,
        caption_channels=4096)),
}
