"""AutoencoderKLCogVideoX (CogVideoX, CogVideoX 1.5, ConsisID): causal conv3d whose time padding comes from the
previous frame batch (the conv cache each part returns; band-local), zero-padded convs, GroupNorm, a spatial norm
conditioned on the latents (nearest-resized: bands stay aligned), nearest x2 upsampling, and a downsampler that pads
the bottom and right edges before a stride-2 conv, after an optional average over frame pairs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpar.engines.halo import pad_rows_at_edges
from diffpar.engines.vae_split import ModuleRule, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import CONV, ROW_LOCAL


def _average_frame_pairs(x):
    """CogVideoX's time compression, per pixel: the first frame alone when the count is odd, then pairs averaged."""
    batch, channels, frames, rows, width = x.shape
    x = x.permute(0, 3, 4, 1, 2).reshape(batch * rows * width, channels, frames)
    if frames % 2 == 1:
        first, rest = x[..., :1], x[..., 1:]
        x = torch.cat([first, F.avg_pool1d(rest, kernel_size=2, stride=2)], dim=-1) if rest.shape[-1] else first
    else:
        x = F.avg_pool1d(x, kernel_size=2, stride=2)
    return x.reshape(batch, rows, width, channels, x.shape[-1]).permute(0, 3, 4, 1, 2)


def _downsample_wrapper(state, module):
    # F.pad(x, (0, 1, 0, 1)) pads the image's bottom edge only: a band above it takes that row from its neighbour
    # (in the halo of the stride-2 conv) instead.
    @while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        if module.compress_time:
            x = _average_frame_pairs(x)
        x = pad_rows_at_edges(x, (0, 1, 0, 1), split)
        batch, channels, frames, rows, width = x.shape
        x = module.conv(x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, rows, width))
        return x.reshape(batch, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)

    return wrapper


COGVIDEOX_RULES = {
    **dict.fromkeys(("CogVideoXEncoder3D", "CogVideoXDecoder3D", "CogVideoXDownBlock3D", "CogVideoXUpBlock3D",
                     "CogVideoXMidBlock3D", "CogVideoXResnetBlock3D"), ROW_LOCAL),
    # Time padding from the cache or the first frame; rows come from its inner zero-padded conv (halo).
    "CogVideoXCausalConv3d": ROW_LOCAL.but(
        refuse=lambda m: "replicate padding in a CogVideoX causal conv" if m.pad_mode == "replicate" else None),
    "CogVideoXSafeConv3d": CONV,  # nn.Conv3d that only chunks frames for memory: the conv of each chunk
    # The latents resized (nearest) to this level's size: a band of latent rows to the same band at this level.
    "CogVideoXSpatialNorm3D": ROW_LOCAL,
    "CogVideoXUpsample3D": ROW_LOCAL,  # nearest x2, then a halo conv
    "CogVideoXDownsample3D": ModuleRule("frame-pair average, pad at the image's bottom edge, stride-2 halo conv",
                                        wrap=_downsample_wrapper),
}

register_vae("AutoencoderKLCogVideoX", rules=COGVIDEOX_RULES, video=True)
