"""Tiny Helios transformer (with its short / mid / long history latents, as the pipeline passes them), its cases
and real config."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("helios")
def _helios(heads=4, head_dim=16, layers=3, amplify_history=False):
    from diffusers import HeliosTransformer3DModel

    # 3 blocks: diffusers' own plan (blocks 0..39 by name) fails on this depth; ours is built for it.
    model = construct(
        HeliosTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers,
        rope_dim=(4, 6, 6) if head_dim == 16 else (head_dim // 4, head_dim // 4 + head_dim % 4, head_dim // 2),
        is_amplify_history=amplify_history,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, history=True):
        # Current tokens = 1 frame * (H/2) * (W/2) with H = 2: W = 2 * seq. The history latents add an even count
        # (short 2 frames: 2 * seq; mid and long, down-sampled: 2 * ceil(seq / 4) and ceil(seq / 4)... padded by the
        # model), so an odd seq gives an odd total.
        g = torch.Generator().manual_seed(seed)
        width = 2 * seq
        kw = dict(
            hidden_states=torch.randn(batch, 4, 1, 2, width, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            return_dict=False,
        )
        if history:
            kw.update(
                indices_hidden_states=torch.tensor([[8]] * batch),
                indices_latents_history_short=torch.tensor([[6, 7]] * batch),
                latents_history_short=torch.randn(batch, 4, 2, 2, width, generator=g),
                indices_latents_history_mid=torch.tensor([[4, 5]] * batch),
                latents_history_mid=torch.randn(batch, 4, 2, 2, width, generator=g),
                indices_latents_history_long=torch.tensor([[0, 1, 2, 3]] * batch),
                latents_history_long=torch.randn(batch, 4, 4, 2, width, generator=g),
            )
        return kw

    return model, inputs


CASES = [
    ModelCase("helios", "HeliosTransformer3DModel", kind="video",
              notes="diffusers' plan built for the model's depth; history latents"),
    ModelCase("helios_amplify_history", "HeliosTransformer3DModel", kind="video", cp=(), tp=(),
              model_kwargs={"heads": 4, "amplify_history": True},
              refused="scales the keys of the history tokens, found by their position in the whole sequence"),
]
builder("helios_amplify_history")(_helios)

REAL_CONFIGS = {
    "Helios-14B": ("HeliosTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_dim=(44, 42, 42))),
}
