"""AutoencoderKLKVAE (Kandinsky's image VAE): replicate- and reflect-padded 3x3 convs, GroupNorm, a decoder whose
norms are modulated by the latents resized (nearest) to each level, pixel-(un)shuffle resampling beside a strided
(or nearest-upsampled) halo conv. No attention."""
from __future__ import annotations

from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ALIGNED, ROW_LOCAL

KVAE_RULES = {
    **dict.fromkeys(("KVAEEncoder2D", "KVAEDecoder2D", "KVAEResnetBlock2D"), ROW_LOCAL),
    "Module": ROW_LOCAL,  # the plain nn.Module()s that only hold a level's blocks (never called)
    # The band's latents resized (nearest, an integer factor) to the band at this level, then 1x1 (or halo) convs.
    "KVAEDecoderSpatialNorm2D": ROW_LOCAL,
    # Pixel unshuffle and channel means beside a stride-2 halo conv (its stride makes encode bands even here).
    "KVAEPXSDownsample": ALIGNED,
    "KVAEPXSUpsample": ALIGNED,  # channel repeat, pixel shuffle and nearest x2 beside a halo conv
    "PixelUnshuffle": ALIGNED, "PixelShuffle": ALIGNED,
}

register_vae("AutoencoderKLKVAE", rules=KVAE_RULES, video=False)
