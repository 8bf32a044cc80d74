"""AutoencoderKLMochi (Mochi 1): replicate-padded causal conv3d (CogVideoX's class in replicate mode), per-frame
GroupNorm, attention over the frames of each pixel (row-local), strided-conv downsampling, linear depth-to-space
upsampling, Fourier features of each pixel."""
from __future__ import annotations

import torch.nn.functional as F

from diffpar.engines.vae_split import ModuleRule, RowGeometry, halo_conv, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ALIGNED, ROW_LOCAL


def _replicate_causal_geometry(module) -> RowGeometry:
    conv = module.conv
    return RowGeometry(conv.kernel_size[1], conv.stride[1], conv.dilation[1], module.height_pad, module.height_pad)


def _replicate_causal_conv_wrapper(state, module):
    """F.pad(replicate) of (W, H, T-front), then the inner conv3d with no padding; no conv cache in this mode."""
    geometry, p = _replicate_causal_geometry(module), module.time_causal_padding

    def pad_fn(t, top, bottom):
        return F.pad(t, (p[0], p[1], top, bottom, p[4], p[5]), mode="replicate")

    @while_split(state, "inputs")
    def wrapper(split, x, args, kwargs):
        return halo_conv(x, split, geometry, pad_fn, module.conv), None

    return wrapper


def _causal_conv_refuse(module) -> str | None:
    if module.pad_mode != "replicate":
        return ("a causal conv in constant mode (Mochi's frame-wise decoding: vae._enable_framewise_decoding()); "
                "decode the whole clip at once, the default")
    return None


def _attention_refuse(attn) -> str | None:
    processor = type(attn.processor).__name__
    if processor != "MochiVaeAttnProcessor2_0":
        return f"attention processor {processor} (Mochi's VAE attention runs over frames with MochiVaeAttnProcessor2_0)"
    return None


MOCHI_RULES = {
    **dict.fromkeys(("MochiEncoder3D", "MochiDecoder3D", "MochiDownBlock3D", "MochiMidBlock3D",
                     "MochiResnetBlock3D", "MochiChunkedGroupNorm3D", "FourierFeatures"), ROW_LOCAL),
    "MochiUpBlock3D": ALIGNED,  # a per-pixel Linear, then depth-to-space: every band's rows grow alike
    "CogVideoXCausalConv3d": ModuleRule("causal conv3d, replicate padding, halo", wrap=_replicate_causal_conv_wrapper,
                                        geometry=_replicate_causal_geometry, owns_children=True,
                                        refuse=_causal_conv_refuse),
    # The blocks call attention on (batch * rows * columns, frames, channels): each pixel's frames, within a band.
    "Attention": ROW_LOCAL.but(refuse=_attention_refuse),
    "LpNorm": ROW_LOCAL,  # q/k norm over the channels of each token
}

register_vae("AutoencoderKLMochi", rules=MOCHI_RULES, video=True)
