"""AutoencoderKLHunyuanImage (HunyuanImage 2.1): 3x3 convs, GroupNorm, space-to-depth downsampling and
depth-to-space upsampling with channel-mean / repeat shortcuts, one single-head attention over the whole image in
each mid block; the encoder's and decoder's own per-pixel shortcuts (channel means, repeat_interleave)."""
from __future__ import annotations

import torch

from diffpar.engines.vae_split import ModuleRule, single_head_attention_over_bands, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ALIGNED, ROW_LOCAL


def _image_attention_wrapper(state, block):
    """Queries of this band over the keys and values of every band; the GroupNorm child takes whole-image stats."""

    @while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        identity = x
        h = block.norm(x)
        batch, channels, rows, width = h.shape

        def tokens(t):
            return t.permute(0, 2, 3, 1).reshape(batch, 1, rows * width, channels)

        qkv = torch.cat([tokens(block.to_q(h)), tokens(block.to_k(h)), tokens(block.to_v(h))], dim=-1)
        out = single_head_attention_over_bands(qkv, split, rows, width)
        out = out.reshape(batch, rows, width, channels).permute(0, 3, 1, 2)
        return block.proj(out) + identity

    return wrapper


HUNYUAN_IMAGE_RULES = {
    **dict.fromkeys(("HunyuanImageEncoder2D", "HunyuanImageDecoder2D", "HunyuanImageMidBlock",
                     "HunyuanImageResnetBlock"), ROW_LOCAL),
    # Space-to-depth after a halo conv: an encode band must hold whole 2-row pairs.
    "HunyuanImageDownsample": ALIGNED.but(row_factor=lambda m: 2),
    "HunyuanImageUpsample": ALIGNED,  # depth-to-space after a halo conv: every band's rows double
    "HunyuanImageAttentionBlock": ModuleRule("single-head attention over the whole image, local queries",
                                             wrap=_image_attention_wrapper, gathers_keys=True),
}

register_vae("AutoencoderKLHunyuanImage", rules=HUNYUAN_IMAGE_RULES, video=False)
