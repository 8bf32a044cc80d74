"""AutoencoderKLMagvit (EasyAnimate): causal conv3d (an nn.Conv3d that pads time by repeating the first frame or
from its cache of the previous call's frames, then convolves window by window), GroupNorm per frame or over the
clip, downsamplers that pad the bottom and right edges before a stride-2 causal conv, nearest upsampling (in space;
in time nearest or trilinear, which never mixes rows). No attention. The VAE decodes (encodes) the first frame
alone, then frame batches that reuse each conv's cache: every call has the same height, so the same bands, and
each rank's cache holds its own band."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpar.engines.halo import pad_rows_at_edges
from diffpar.engines.vae_split import ModuleRule, RowGeometry, halo_conv, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ROW_LOCAL


def _causal_conv_geometry(conv) -> RowGeometry:
    return RowGeometry(conv.kernel_size[1], conv.stride[1], conv.dilation[1], conv.padding[1])


def _causal_conv_wrapper(state, conv):
    """EasyAnimateCausalConv3d.forward on a band: its time padding and cache (row-local) as the layer does them,
    then one halo exchange for the whole padded clip, then its windows over time with no row padding."""
    geometry = _causal_conv_geometry(conv)
    w_pad = conv.padding[2]

    def pad_fn(t, top, bottom):
        return F.pad(t, (w_pad, w_pad, top, bottom, 0, 0))

    def run(t):
        window, outputs, i = conv.temporal_padding + 1, [], 0
        while i + window <= t.shape[2]:
            outputs.append(F.conv3d(t[:, :, i:i + window], conv.weight, conv.bias, conv.stride, 0, conv.dilation,
                                    conv.groups))
            i += conv.t_stride
        return torch.concat(outputs, 2)

    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        dtype = x.dtype
        if conv.prev_features is None:
            x = F.pad(x, pad=(0, 0, 0, 0, conv.temporal_padding, 0), mode="replicate").to(dtype=dtype)
        elif conv.t_stride == 2:
            x = torch.concat([conv.prev_features[:, :, -(conv.temporal_padding - 1):], x], dim=2).to(dtype=dtype)
        else:
            x = torch.concat([conv.prev_features, x], dim=2).to(dtype=dtype)
        conv._clear_conv_cache()
        conv.prev_features = x[:, :, -conv.temporal_padding:].clone()  # this band's rows
        return halo_conv(x, split, geometry, pad_fn, run)

    return wrapper


def _causal_conv_refuse(conv) -> str | None:
    if conv.padding_mode != "zeros":
        return f"an EasyAnimate causal conv with padding_mode={conv.padding_mode!r}"
    if conv.padding[0] != 0:
        return "an EasyAnimate causal conv with time padding in its nn.Conv3d"
    return None


def _downsampler_wrapper(state, module):
    # F.pad(x, (0, 1, 0, 1)) pads the image's bottom row only; the stride-2 conv (wrapped) reads across band edges.
    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        return module.conv(pad_rows_at_edges(x, (0, 1, 0, 1), split))

    return wrapper


MAGVIT_RULES = {
    **dict.fromkeys(("EasyAnimateEncoder", "EasyAnimateDecoder", "EasyAnimateDownBlock3D", "EasyAnimateUpBlock3d",
                     "EasyAnimateMidBlock3d", "EasyAnimateResidualBlock3D"), ROW_LOCAL),
    "EasyAnimateCausalConv3d": ModuleRule("causal conv3d with a frame cache, one halo exchange per call",
                                          wrap=_causal_conv_wrapper, geometry=_causal_conv_geometry,
                                          refuse=_causal_conv_refuse),
    "EasyAnimateDownsampler3D": ModuleRule("pad the bottom edge, then a stride-2 halo causal conv",
                                           wrap=_downsampler_wrapper),
    # Nearest x2 in space (each band's rows double), then a halo conv; in time nearest or trilinear at row scale 1.
    "EasyAnimateUpsampler3D": ROW_LOCAL,
}

register_vae("AutoencoderKLMagvit", rules=MAGVIT_RULES, video=True)
