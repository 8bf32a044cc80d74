"""Wan 2.1 / 2.2 and QwenImage: causal conv3d with per-frame caches (halo on the cache-extended input), per-pixel
RMS norms, nearest upsampling, per-frame mid-block attention; Wan 2.2's residual blocks add space-to-depth
shortcuts (patchify runs outside the encoder/decoder)."""
from __future__ import annotations

from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ALIGNED, FRAME_ATTENTION, NEAREST_UPSAMPLE, PREPADDED_CAUSAL_CONV, ROW_LOCAL

WAN_RULES = {
    **dict.fromkeys(("WanEncoder3d", "WanDecoder3d", "WanMidBlock", "WanUpBlock", "WanResidualUpBlock",
                     "WanResidualDownBlock", "WanResidualBlock", "WanResample"), ROW_LOCAL),
    "WanRMS_norm": ROW_LOCAL,  # RMS over the channels of each pixel
    "WanUpsample": NEAREST_UPSAMPLE,
    # Space-to-depth shortcuts beside a strided conv (Wan 2.2): their factor adds nothing to the encoder's stride.
    "AvgDown3D": ALIGNED, "DupUp3D": ALIGNED,
    "WanCausalConv3d": PREPADDED_CAUSAL_CONV,
    "WanAttentionBlock": FRAME_ATTENTION,
}

QWEN_IMAGE_RULES = {
    **dict.fromkeys(("QwenImageEncoder3d", "QwenImageDecoder3d", "QwenImageMidBlock", "QwenImageUpBlock",
                     "QwenImageResidualBlock", "QwenImageResample", "QwenImageRMS_norm"), ROW_LOCAL),
    "QwenImageUpsample": NEAREST_UPSAMPLE,
    "QwenImageCausalConv3d": PREPADDED_CAUSAL_CONV,
    "QwenImageAttentionBlock": FRAME_ATTENTION,
}

register_vae("AutoencoderKLWan", rules=WAN_RULES, video=True)
register_vae("AutoencoderKLQwenImage", rules=QWEN_IMAGE_RULES, video=True)
