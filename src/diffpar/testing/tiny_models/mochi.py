"""Tiny Mochi transformer: asymmetric joint attention (a narrower prompt stream) with a prompt padding mask."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("mochi")
def _mochi(heads=2, head_dim=16, layers=2):
    from diffusers import MochiTransformer3DModel

    model = construct(
        MochiTransformer3DModel,
        patch_size=2, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        pooled_projection_dim=24, in_channels=4, out_channels=4, text_embed_dim=16, time_embed_dim=16,
    )
    with torch.no_grad():  # created as zeros (loaded from the checkpoint): seeded values so RoPE matters
        model.pos_frequencies.copy_(torch.randn(model.pos_frequencies.shape))

    def inputs(seq=16, text=8, batch=1, seed=1, valid=None, left_pad=False):
        # One latent frame of 2 x 2*seq pixels: seq video tokens with 2x2 patches. `valid`: real prompt tokens
        # per row, padded at the end as the pipeline's tokenizer pads them (`left_pad`: at the start).
        g = torch.Generator().manual_seed(seed)
        valid = valid or [text] * batch
        mask = torch.zeros(batch, text, dtype=torch.long)
        for row, n in enumerate(valid):
            if left_pad:
                mask[row, text - n:] = 1
            else:
                mask[row, :n] = 1
        return dict(
            hidden_states=torch.randn(batch, 4, 1, 2, 2 * seq, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_attention_mask=mask,
            return_dict=False,
        )

    return model, inputs


CASES = [
    # head_dim 12: a 48-wide model whose SwiGLU width (8 * 48 / 3 = 128) divides evenly over 4 ranks.
    ModelCase("mochi", "MochiTransformer3DModel", kind="video", pipelines=("MochiPipeline",),
              model_kwargs={"heads": 4, "head_dim": 12},
              notes="prompt padding cut before the split, key mask in Ulysses order; TP: per-head RoPE frequencies "
                    "sliced by heads"),
]

REAL_CONFIGS = {
    "Mochi-1-preview": ("MochiTransformer3DModel", dict(
        patch_size=2, num_attention_heads=24, attention_head_dim=128, num_layers=48, pooled_projection_dim=1536,
        in_channels=12, text_embed_dim=4096, time_embed_dim=256)),
}
