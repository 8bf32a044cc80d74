"""AutoencoderKLKVAEVideo (Kandinsky's video VAE): causal conv3d that replicate-pads rows and columns and carries
its time padding from one call to the next in a cache dict (the padded input's last frames), GroupNorm over the
clip, a decoder whose norms are modulated by the latents resized (nearest) to each level, pixel-(un)shuffle
resampling beside reflect-padded strided / upsampled convs, time resampling per pixel. The VAE runs its clip in
segments that hand the caches on: every segment has the same height, so the same bands, and each rank's caches
hold its own band, halo rows included."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffpar.engines.vae_split import ModuleRule, RowGeometry, conv_geometry, conv_wrapper, halo_conv, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ALIGNED, ROW_LOCAL


def _cached_causal_geometry(module) -> RowGeometry:
    # diffusers pads (height_pad, height_pad, width_pad, width_pad) in F.pad's last-dim-first order: the rows get
    # width_pad, the columns height_pad (equal for its square kernels).
    conv = module.conv
    return RowGeometry(conv.kernel_size[1], conv.stride[1], conv.dilation[1], module.width_pad, module.width_pad)


def _cached_causal_conv_wrapper(state, module):
    """The replicate padding with halo rows from the neighbours, then the layer's own time cache and conv on the
    padded band; the cache keeps the padded band, so the next segment's time padding has the same halo rows."""
    geometry, conv = _cached_causal_geometry(module), module.conv

    def pad_fn(t, top, bottom):
        return F.pad(t, (module.height_pad, module.height_pad, top, bottom, 0, 0), mode="replicate")

    @while_split(state, "input")
    def wrapper(split, x, args, kwargs):
        cache = args[1] if len(args) > 1 else kwargs["cache"]

        def run(padded):  # KVAECachedCausalConv3d.forward after its F.pad, output frames joined instead of written
            t_stride, kernel_t = module.stride[0], module.time_kernel_size
            if cache["padding"] is None:
                first = padded[:, :, :1]
                padding = first.expand(first.shape[0], first.shape[1], module.time_pad, *first.shape[3:])
            else:
                padding = cache["padding"]
            frames_out = (x.size(2) + 1) // 2 if t_stride == 2 else x.size(2)
            offset_out = math.ceil(padding.size(2) / t_stride)
            offset_in = offset_out * t_stride - padding.size(2)
            parts = []
            if offset_out > 0:
                parts.append(conv(torch.cat([padding, padded[:, :, :offset_in + kernel_t - t_stride]], dim=2)))
            if offset_out < frames_out:
                parts.append(conv(padded[:, :, offset_in:]))
            pad_offset = offset_in + t_stride * math.trunc((padded.size(2) - offset_in - kernel_t) / t_stride) + t_stride
            cache["padding"] = torch.clone(padded[:, :, pad_offset:])
            return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]

        return halo_conv(x, split, geometry, pad_fn, run)

    return wrapper


def _cached_causal_refuse(module) -> str | None:
    if module.conv.padding_mode != "zeros" or any(module.conv.padding):
        return "a KVAE causal conv whose inner conv pads by itself"
    if module.stride[1] != 1:
        return f"a KVAE causal conv with row stride {module.stride[1]}"
    return None


def _safe_conv_wrapper(state, conv):
    """KVAESafeConv3d (an nn.Conv3d that chunks time for memory) as a halo conv; `write_to` gets the result."""
    inner = conv_wrapper(state, conv)

    def wrapper(wrapped, instance, args, kwargs):
        if state.active is None:
            return wrapped(*args, **kwargs)
        write_to = args[1] if len(args) > 1 else kwargs.get("write_to")
        out = inner(lambda t: wrapped(t), instance, (args[0] if args else kwargs["input"],), {})
        if write_to is None:
            return out
        write_to[...] = out
        return write_to

    return wrapper


KVAE_VIDEO_RULES = {
    **dict.fromkeys(("KVAECachedEncoder3D", "KVAECachedDecoder3D", "KVAECachedResnetBlock3D", "KVAECachedGroupNorm"),
                    ROW_LOCAL),
    "Module": ROW_LOCAL,  # the plain nn.Module()s that only hold a level's blocks (never called)
    # The band's latents resized (nearest, integer factors) to the band at this level, then 1x1 or halo convs.
    "KVAECachedSpatialNorm3D": ROW_LOCAL,
    "KVAECachedCausalConv3d": ModuleRule(
        "causal conv3d with a time cache, replicate padding, halo", wrap=_cached_causal_conv_wrapper,
        geometry=_cached_causal_geometry, refuse=_cached_causal_refuse,
        owns_children=True),  # its inner conv runs unpadded on the halo-padded band inside the wrapper
    "KVAESafeConv3d": ModuleRule("halo convolution (time-chunked nn.Conv3d)", wrap=_safe_conv_wrapper,
                                 geometry=conv_geometry,
                                 refuse=lambda m: f"padding_mode={m.padding_mode!r}"
                                 if m.padding_mode not in ("zeros", "replicate", "reflect") else None),
    # Pixel unshuffle and channel means beside a stride-2 halo conv (whose stride makes encode bands even), then
    # time resampling per pixel.
    "KVAECachedPXSDownsample": ALIGNED,
    "KVAECachedPXSUpsample": ALIGNED,  # time repeat per pixel, nearest x2 beside a halo conv
    "PixelUnshuffle": ALIGNED, "PixelShuffle": ALIGNED, "AvgPool3d": ALIGNED,
}

register_vae("AutoencoderKLKVAEVideo", rules=KVAE_VIDEO_RULES, video=True)
