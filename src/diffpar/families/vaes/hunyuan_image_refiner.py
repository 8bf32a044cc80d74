"""AutoencoderKLHunyuanImageRefiner (HunyuanImage 2.1's refiner VAE): HunyuanVideo 1.5's layout (replicate-padded
causal conv3d, per-pixel RMS norms, space-to-depth / depth-to-space resampling with channel-mean / repeat
shortcuts) where resampling treats every frame alike, and a single-head mid-block attention over every frame's
pixels with no mask."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpar.engines.vae_split import ModuleRule, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.hunyuan_video import CAUSAL_CONV3D
from diffpar.families.vaes.rules import ALIGNED, ROW_LOCAL


def _clip_attention_wrapper(state, block):
    """This band's queries over the keys and values of every band and every frame (the block passes no mask)."""

    @while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        identity = x
        h = block.norm(x)  # per pixel: no statistics cross rows
        query, key, value = block.to_q(h), block.to_k(h), block.to_v(h)
        batch, channels, frames, rows, width = query.shape
        query = query.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, F*h*W, C) in (frame, row, column) order
        kv = split.gather(torch.cat([key, value], dim=1).permute(0, 2, 3, 4, 1), dim=2)  # (B, F, all rows, W, 2C)
        key, value = kv.reshape(batch, 1, -1, 2 * channels).split(channels, dim=-1)
        out = F.scaled_dot_product_attention(query, key, value)
        out = out.squeeze(1).reshape(batch, frames, rows, width, channels).permute(0, 4, 1, 2, 3)
        return block.proj_out(out) + identity

    return wrapper


HUNYUAN_IMAGE_REFINER_RULES = {
    **dict.fromkeys(("HunyuanImageRefinerEncoder3D", "HunyuanImageRefinerDecoder3D", "HunyuanImageRefinerDownBlock3D",
                     "HunyuanImageRefinerUpBlock3D", "HunyuanImageRefinerMidBlock", "HunyuanImageRefinerResnetBlock",
                     "HunyuanImageRefinerRMS_norm"), ROW_LOCAL),
    # A causal conv then space-to-depth by 2 in height: an encode band must hold whole row pairs.
    "HunyuanImageRefinerDownsampleDCAE": ALIGNED.but(row_factor=lambda m: 2),
    "HunyuanImageRefinerUpsampleDCAE": ALIGNED,  # depth-to-space after a causal conv: every band's rows double
    "HunyuanImageRefinerCausalConv3d": CAUSAL_CONV3D,
    "HunyuanImageRefinerAttnBlock": ModuleRule("single-head attention over all pixels of all frames, local queries",
                                               wrap=_clip_attention_wrapper, gathers_keys=True),
}

register_vae("AutoencoderKLHunyuanImageRefiner", rules=HUNYUAN_IMAGE_REFINER_RULES, video=True)
