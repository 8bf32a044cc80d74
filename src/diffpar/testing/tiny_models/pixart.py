"""PixArt-Alpha / Sigma (`PixArtTransformer2DModel`): tiny seeded builder, harness case, real configuration."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct, prompt_mask


def grid(tokens: int) -> tuple[int, int]:
    """(rows, cols) of patches with rows * cols == tokens, as square as the count allows (16 -> 4 x 4, 15 -> 3 x 5,
    17 -> 1 x 17): a 2-D grid, so the positional embedding differs along both axes."""
    rows = max(r for r in range(1, int(tokens ** 0.5) + 1) if tokens % r == 0)
    return rows, tokens // rows


@builder("pixart")
def _pixart(heads=2, head_dim=8, layers=2, caption_channels=16):
    from diffusers import PixArtTransformer2DModel

    model = construct(
        PixArtTransformer2DModel,
        sample_size=8, num_layers=layers, patch_size=2, attention_head_dim=head_dim, num_attention_heads=heads,
        in_channels=4, out_channels=8, cross_attention_dim=heads * head_dim, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
        caption_channels=caption_channels,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0):
        # seq image tokens after 2 x 2 patches, on a rows x cols grid; text_padding masks the prompt's last tokens.
        g = torch.Generator().manual_seed(seed)
        rows, cols = grid(seq)
        mask = prompt_mask(batch, text, text_padding)
        return dict(
            hidden_states=torch.randn(batch, 4, 2 * rows, 2 * cols, generator=g),
            encoder_hidden_states=torch.randn(batch, text, caption_channels, generator=g),
            encoder_attention_mask=mask,
            timestep=torch.full((batch,), 500, dtype=torch.long),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("pixart", "PixArtTransformer2DModel", input_kwargs={"text_padding": 3},
              pipelines=(), notes="self-attention split; cross-attention to the whole (masked) prompt local"),
]

REAL_CONFIGS = {
    "PixArt-Sigma-XL-2-1024-MS": ("PixArtTransformer2DModel", dict(
        sample_size=128, num_layers=28, attention_head_dim=72, num_attention_heads=16, in_channels=4,
        out_channels=8, patch_size=2, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False, interpolation_scale=2)),
}
