"""AutoencoderKLTemporalDecoder (Stable Video Diffusion): AutoencoderKL's encoder, and a decoder of (frames, C, H, W)
images whose blocks mix each pixel across frames (Conv3d with a (3, 1, 1) kernel, an alpha blend per frame) beside
2-D resnets, mid-block attention within each frame and nearest upsampling."""
from __future__ import annotations

from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.kl import KL_RULES
from diffpar.families.vaes.rules import ROW_LOCAL

TEMPORAL_DECODER_RULES = {
    **KL_RULES,  # the encoder, the 2-D resnets, Upsample2D and the mid-block Attention (4-D, within a frame)
    **dict.fromkeys(("TemporalDecoder", "MidBlockTemporalDecoder", "UpBlockTemporalDecoder",
                     "SpatioTemporalResBlock", "TemporalResnetBlock", "AlphaBlender"), ROW_LOCAL),
}

register_vae("AutoencoderKLTemporalDecoder", rules=TEMPORAL_DECODER_RULES, video=False)
