"""AutoencoderKLAllegro: AutoencoderKL's 2D layers (3x3 convs, GroupNorm, strided / nearest resampling, per-frame
mid-block attention) on every frame, between temporal conv layers whose kernels are 1 row tall (frame mixing, row
-local) with GroupNorm over the clip. diffusers decodes (encodes) Allegro only in tiles: each tile the VAE hands its
decoder (encoder) is split over the ranks."""
from __future__ import annotations

from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.kl import KL_RULES
from diffpar.families.vaes.rules import ROW_LOCAL


def _temporal_conv_refuse(layer) -> str | None:
    # Its Conv3d children (wrapped as halo convs when taller than 1 row) carry the rows; this only checks they are 1.
    tall = [c.kernel_size for c in layer.modules() if hasattr(c, "kernel_size") and c.kernel_size[1] != 1]
    return f"an Allegro temporal conv layer with spatial kernels {tall}" if tall else None


ALLEGRO_RULES = {
    **KL_RULES,
    **dict.fromkeys(("AllegroEncoder3D", "AllegroDecoder3D", "AllegroDownBlock3D", "AllegroUpBlock3D",
                     "AllegroMidBlock3DConv"), ROW_LOCAL),
    # Repeats the first and last frames, then (3, 1, 1) convs: every row is mixed only with itself over time.
    "AllegroTemporalConvLayer": ROW_LOCAL.but(refuse=_temporal_conv_refuse),
}

register_vae("AutoencoderKLAllegro", rules=ALLEGRO_RULES, video=True)
