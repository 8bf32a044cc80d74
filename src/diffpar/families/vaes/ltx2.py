"""AutoencoderKLLTX2Video (LTX-2): LTX-Video's layout with per-pixel RMS norms, causal (or centred) time padding by
frame repetition, zero- or reflect-padded convs, space-to-depth downsamplers and depth-to-space upsamplers with
residuals, patchify inside the encoder and decoder, an optional timestep-conditioned decoder."""
from __future__ import annotations

from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ALIGNED, ROW_LOCAL

LTX2_VIDEO_RULES = {
    "LTX2VideoEncoder3d": ALIGNED.but(row_factor=lambda m: m.patch_size),  # patchify before its first conv
    "LTX2VideoDecoder3d": ALIGNED,  # unpatchify after its last conv
    **dict.fromkeys(("LTX2VideoDownBlock3D", "LTX2VideoMidBlock3d", "LTX2VideoUpBlock3d"), ROW_LOCAL),
    "LTX2VideoResnetBlock3d": ROW_LOCAL.but(
        refuse=lambda m: "spatial noise injection (its noise would depend on the band's shape)"
        if getattr(m, "per_channel_scale1", None) is not None else None),
    "LTX2VideoCausalConv3d": ROW_LOCAL,  # pads time by repeating frames, then its inner nn.Conv3d (halo)
    # Space-to-depth on the encoder's main path: rows shrink by the spatial stride.
    "LTX2VideoDownsampler3d": ALIGNED.but(row_factor=lambda m: m.stride[1]),
    "LTX2VideoUpsampler3d": ALIGNED,
    "PerChannelRMSNorm": ROW_LOCAL,  # over the channels of each pixel
    **dict.fromkeys(("PixArtAlphaCombinedTimestepSizeEmbeddings", "TimestepEmbedding", "Timesteps"), ROW_LOCAL),
}

register_vae("AutoencoderKLLTX2Video", rules=LTX2_VIDEO_RULES, video=True)
