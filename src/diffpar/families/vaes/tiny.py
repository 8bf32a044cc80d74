"""AutoencoderTiny (TAESD-style; the DreamLite pipeline's VAE): 3x3 convolutions (stride 2 on the way down), ReLU,
nearest upsampling and residual blocks of those; no norm and no attention, so every part is row-local around its
halo convolutions (the decoder's tanh clamp and the encoder's and decoder's rescaling are pointwise)."""
from __future__ import annotations

from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ROW_LOCAL

TINY_RULES = dict.fromkeys(("EncoderTiny", "DecoderTiny", "AutoencoderTinyBlock"), ROW_LOCAL)

register_vae("AutoencoderTiny", rules=TINY_RULES, video=False)
