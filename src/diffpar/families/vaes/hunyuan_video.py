"""AutoencoderKLHunyuanVideo: replicate-padded causal conv3d, GroupNorm over frames, frame-causal mid-block
attention (every frame's tokens, a key frame never after its query frame)."""
from __future__ import annotations

import torch.nn.functional as F

from diffpar.engines.vae_split import (
    ModuleRule,
    RowGeometry,
    attention_over_bands,
    conv_geometry,
    halo_conv,
    while_split,
)
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ATTENTION, ROW_LOCAL


def _causal_conv_geometry(module) -> RowGeometry:
    conv, p = module.conv, module.time_causal_padding  # p: (W left, W right, H top, H bottom, T front, T back)
    return RowGeometry(conv.kernel_size[1], conv.stride[1], conv.dilation[1], p[2], p[3])


def _causal_conv_wrapper(state, module):
    """F.pad(replicate) of (W, H, T-front), then the inner conv3d with no padding."""
    geometry, p = _causal_conv_geometry(module), module.time_causal_padding

    def pad_fn(t, top, bottom):
        return F.pad(t, (p[0], p[1], top, bottom, p[4], p[5]), mode=module.pad_mode)

    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        return halo_conv(x, split, geometry, pad_fn, module.conv)

    return wrapper


def _causal_mid_block_wrapper(state, block):
    """Resnets around attention over all frames' tokens with a frame-causal mask."""

    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        x = block.resnets[0](x)
        for attn, resnet in zip(block.attentions, block.resnets[1:]):
            if attn is not None:
                batch, channels, frames, rows, width = x.shape
                tokens = x.permute(0, 2, 3, 4, 1).flatten(1, 3)
                tokens = attention_over_bands(attn, tokens, (frames, rows, width), split, frame_causal=True)
                x = tokens.unflatten(1, (frames, rows, width)).permute(0, 4, 1, 2, 3)
            x = resnet(x)
        return x

    return wrapper



# HunyuanVideo's replicate-padded causal conv3d (HunyuanVideo 1.5 and the HunyuanImage refiner use the same one).
CAUSAL_CONV3D = ModuleRule(
    "causal conv3d, replicate padding, halo", wrap=_causal_conv_wrapper, geometry=_causal_conv_geometry,
    owns_children=True,  # its inner nn.Conv3d runs unpadded inside the wrapper: not wrapped again
    refuse=lambda m: "zero padding inside a replicate-padded causal conv" if conv_geometry(m.conv).pad_top else None)


HUNYUAN_VIDEO_RULES = {
    **dict.fromkeys(("HunyuanVideoEncoder3D", "HunyuanVideoDecoder3D", "HunyuanVideoDownBlock3D",
                     "HunyuanVideoUpBlock3D", "HunyuanVideoResnetBlockCausal3D"), ROW_LOCAL),
    "HunyuanVideoUpsampleCausal3D": ROW_LOCAL,  # nearest interpolation, then a causal conv
    "HunyuanVideoDownsampleCausal3D": ROW_LOCAL,  # a strided causal conv
    "HunyuanVideoCausalConv3d": CAUSAL_CONV3D,
    # Its attentions are counted (and checked) under their own record.
    "HunyuanVideoMidBlock3D": ModuleRule("mid block with frame-causal attention, local queries",
                                         wrap=_causal_mid_block_wrapper),
    "Attention": ATTENTION,
}

register_vae("AutoencoderKLHunyuanVideo", rules=HUNYUAN_VIDEO_RULES, video=True)
