"""Tiny Latte transformer: spatial blocks over each frame's patches, temporal blocks across frames."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("latte")
def _latte(heads=2, head_dim=8, layers=2, frames=2):
    from diffusers import LatteTransformer3DModel

    model = construct(
        LatteTransformer3DModel,
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        cross_attention_dim=heads * head_dim, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=16, video_length=frames,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        # `frames` latent frames of 2 x 2*seq pixels: seq patches per frame (the spatial sequence) with 2x2 patches.
        # No prompt mask: Latte's forward does not repeat it per frame as it does the prompt (the pipeline passes
        # none).
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, frames, 2, 2 * seq, generator=g),
            timestep=torch.full((batch,), 500, dtype=torch.long),
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("latte", "LatteTransformer3DModel", kind="video", pipelines=("LattePipeline",),
              notes="patches split: spatial attention context-parallel, temporal attention (over frames) local"),
]

REAL_CONFIGS = {
    "Latte-1": ("LatteTransformer3DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, sample_size=64, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=4096, video_length=16)),
}
