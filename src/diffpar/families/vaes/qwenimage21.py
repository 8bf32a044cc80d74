"""AutoencoderKLQwenImage21 (Qwen-Image 2): Wan 2.2's residual layout for single images, (B, C, 1, H, W). Its
causal conv is an nn.Conv2d that pads W and H itself and drops the frame axis: the one kind of its own."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from diffpar.engines.vae_split import ModuleRule, RowGeometry, halo_conv
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ALIGNED, FRAME_ATTENTION, NEAREST_UPSAMPLE, ROW_LOCAL


def _image_conv_geometry(conv) -> RowGeometry:
    # conv._padding is (W left, W right, H top, H bottom); its own padding attribute is (0, 0).
    return RowGeometry(conv.kernel_size[0], conv.stride[0], conv.dilation[0], conv._padding[2], conv._padding[3])


def _image_conv_wrapper(state, conv):
    geometry, p = _image_conv_geometry(conv), conv._padding

    def run(t):
        return nn.Conv2d.forward(conv, t.squeeze(2)).unsqueeze(2)

    def wrapper(wrapped, instance, args, kwargs):
        cache_x = args[1] if len(args) > 1 else kwargs.get("cache_x")
        if state.active is None or cache_x is not None:
            return wrapped(*args, **kwargs)  # not split, or a frame cache: diffusers refuses it (single images)
        x = args[0] if args else kwargs["x"]
        return halo_conv(x, state.active, geometry, lambda t, top, bottom: F.pad(t, (p[0], p[1], top, bottom)), run)

    return wrapper


QWEN_IMAGE_21_RULES = {
    **dict.fromkeys(("QwenImage21Encoder3d", "QwenImage21Decoder3d", "QwenImage21MidBlock", "QwenImage21UpBlock",
                     "QwenImage21ResidualUpBlock", "QwenImage21ResidualDownBlock", "QwenImage21ResidualBlock",
                     "QwenImage21Resample", "QwenImage21RMS_norm"), ROW_LOCAL),
    "QwenImage21Upsample": NEAREST_UPSAMPLE,
    "QwenImage21AvgDown3D": ALIGNED, "QwenImage21DupUp3D": ALIGNED,  # shortcuts beside a strided conv
    "QwenImage21CausalConv3d": ModuleRule("image conv (frame axis dropped), zero padding, halo",
                                          wrap=_image_conv_wrapper, geometry=_image_conv_geometry),
    "QwenImage21AttentionBlock": FRAME_ATTENTION,
}

register_vae("AutoencoderKLQwenImage21", rules=QWEN_IMAGE_21_RULES, video=True)
