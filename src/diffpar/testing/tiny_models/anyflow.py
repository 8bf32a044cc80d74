"""Tiny AnyFlow transformers (bidirectional and FAR causal), their cases and real configs."""
from __future__ import annotations

import torch

from diffpar.families.transformers.anyflow import FAR_REFUSAL
from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

_SMALL = dict(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
              num_layers=2, rope_max_seq_len=64)


def _frames_and_width(seq: int) -> tuple[int, int]:
    """A (frames, tokens per frame) grid of exactly `seq` tokens, with several frames and several tokens per frame
    where `seq` allows (16: 4 x 4; 15: 5 x 3; 17: 17 x 1), so a split crosses frames and rows."""
    per_frame = max(d for d in range(1, int(seq ** 0.5) + 1) if seq % d == 0)
    return seq // per_frame, per_frame


@builder("anyflow")
def _anyflow(heads=4, head_dim=12):
    from diffusers import AnyFlowTransformer3DModel

    model = construct(AnyFlowTransformer3DModel, num_attention_heads=heads, attention_head_dim=head_dim, **_SMALL)

    def inputs(seq=16, text=8, batch=1, seed=1):
        # (B, frames, C, H, W) latents: H = 2 and W = 2 * tokens per frame, patch (1, 2, 2). Every frame has its own
        # timestep pair (t, r), as the flow-map sampler passes them: the per-token modulation differs by frame.
        g = torch.Generator().manual_seed(seed)
        frames, per_frame = _frames_and_width(seq)
        return dict(
            hidden_states=torch.randn(batch, frames, 4, 2, 2 * per_frame, generator=g),
            timestep=torch.rand(batch, frames, generator=g) * 1000,
            r_timestep=torch.rand(batch, frames, generator=g) * 500,
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            return_dict=False,
        )

    return model, inputs


@builder("anyflow_far")
def _anyflow_far(heads=4, head_dim=12):
    from diffusers import AnyFlowFARTransformer3DModel

    model = construct(AnyFlowFARTransformer3DModel, num_attention_heads=heads, attention_head_dim=head_dim,
                      compressed_patch_size=(1, 4, 4), full_chunk_limit=3, chunk_partition=(1, 1), **_SMALL)

    def inputs(seq=16, text=8, batch=1, seed=1):
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 2, 4, 4, 4, generator=g),
            timestep=torch.rand(batch, 2, generator=g) * 1000,
            r_timestep=torch.rand(batch, 2, generator=g) * 500,
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            chunk_partition=[1, 1],
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("anyflow", "AnyFlowTransformer3DModel", kind="video",
              notes="per-frame timesteps: per-token modulation split with the tokens"),
    ModelCase("anyflow_far", "AnyFlowFARTransformer3DModel", kind="video", cp=(), tp=(), refused=FAR_REFUSAL),
]

_ANYFLOW_14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True)
_ANYFLOW_1_3B = dict(_ANYFLOW_14B, num_attention_heads=12, ffn_dim=8960, num_layers=30)

REAL_CONFIGS = {
    "AnyFlow-Wan2.1-14B": ("AnyFlowTransformer3DModel", _ANYFLOW_14B),
    "AnyFlow-Wan2.1-1.3B": ("AnyFlowTransformer3DModel", _ANYFLOW_1_3B),
}
