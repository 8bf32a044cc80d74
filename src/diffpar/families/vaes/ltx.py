"""AutoencoderKLLTXVideo (0.9.0 / 0.9.5 blocks, timestep-conditioned decoder): per-pixel RMS norms, causal conv3d
that pads time by repeating frames, strided-conv and space-to-depth downsamplers, depth-to-space upsamplers,
patchify inside the encoder and decoder."""
from __future__ import annotations

from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ALIGNED, ROW_LOCAL

LTX_VIDEO_RULES = {
    "LTXVideoEncoder3d": ALIGNED.but(row_factor=lambda m: m.patch_size),  # patchify before its first conv
    "LTXVideoDecoder3d": ALIGNED,  # unpatchify after its last conv
    **dict.fromkeys(("LTXVideoDownBlock3D", "LTXVideo095DownBlock3D", "LTXVideoMidBlock3d", "LTXVideoUpBlock3d"),
                    ROW_LOCAL),
    "LTXVideoResnetBlock3d": ROW_LOCAL.but(
        refuse=lambda m: "spatial noise injection (its noise would depend on the band's shape)"
        if getattr(m, "per_channel_scale1", None) is not None else None),
    "LTXVideoCausalConv3d": ROW_LOCAL,  # pads time by repeating frames, then its inner nn.Conv3d
    # Space-to-depth on the encoder's main path: rows shrink by the spatial stride.
    "LTXVideoDownsampler3d": ALIGNED.but(row_factor=lambda m: m.stride[1]),
    "LTXVideoUpsampler3d": ALIGNED,
    "RMSNorm": ROW_LOCAL,  # over channels (last dim after movedim)
    **dict.fromkeys(("PixArtAlphaCombinedTimestepSizeEmbeddings", "TimestepEmbedding", "Timesteps"), ROW_LOCAL),
}

register_vae("AutoencoderKLLTXVideo", rules=LTX_VIDEO_RULES, video=True)
