"""The module-kind records several VAE families share (`ModuleRule`, engines/vae_split.py), and torch's.

A record says how one module class treats a band of image rows. Family files map their class names to these
records (or to a variant, `ROW_LOCAL.but(refuse=...)`), and define a record of their own for a kind only they have.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffpar.engines.vae_split import (
    ModuleRule,
    RowGeometry,
    attention_over_bands,
    conv_geometry,
    conv_wrapper,
    edge_pad_wrapper,
    group_norm_wrapper,
    halo_conv,
    single_head_attention_over_bands,
    while_split,
)

ROW_LOCAL = ModuleRule("row-local: composes its children and row-local ops (pointwise, per-pixel, 1x1)")
ALIGNED = ModuleRule("row-local once bands are multiples of its factor (space-to-depth / depth-to-space)")


# -- torch -----------------------------------------------------------------------------------------------------
def _conv_refuse(conv) -> str | None:
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r} (string padding) is not supported"
    if conv.padding_mode not in ("zeros", "replicate", "reflect"):
        return f"padding_mode={conv.padding_mode!r} wraps rows around the image"
    return None


def _upsample_refuse(up) -> str | None:
    scale = up.scale_factor
    scales = scale if isinstance(scale, tuple) else (scale,)
    if up.mode not in ("nearest", "nearest-exact") or up.size is not None or any(
        s is None or float(s) != int(s) for s in scales
    ):
        return f"{up.mode!r} upsampling by {scale} mixes rows"
    return None


def _layer_norm_refuse(norm) -> str | None:
    if len(norm.normalized_shape) != 1:
        return f"LayerNorm over {tuple(norm.normalized_shape)} (more than channels)"
    return None


CONV = ModuleRule("halo convolution", wrap=conv_wrapper, geometry=conv_geometry, refuse=_conv_refuse)
GROUP_NORM = ModuleRule("whole-image GroupNorm", wrap=group_norm_wrapper, whole_image_stats=True)
EDGE_PAD = ModuleRule("pad only at the image edges", wrap=edge_pad_wrapper)
NEAREST_UPSAMPLE = ModuleRule("nearest upsampling by an integer factor", refuse=_upsample_refuse)

TORCH_RULES: dict[str, ModuleRule] = {
    **dict.fromkeys(("ModuleList", "Sequential", "Identity", "Dropout", "SiLU", "ReLU", "GELU", "Mish", "Tanh",
                     "LeakyReLU", "Sigmoid"), ROW_LOCAL),
    "Linear": ROW_LOCAL,  # on attention tokens or timestep embeddings, never across rows
    "LayerNorm": ROW_LOCAL.but(refuse=_layer_norm_refuse),  # over channels (last dim after movedim)
    "Conv2d": CONV, "Conv3d": CONV,
    "GroupNorm": GROUP_NORM,
    "ZeroPad2d": EDGE_PAD, "ConstantPad2d": EDGE_PAD,
    "Upsample": NEAREST_UPSAMPLE,
}


# -- diffusers' VAE attention (AutoencoderKL mid block, HunyuanVideo) ------------------------------------------
def _attention_refuse(attn) -> str | None:
    processor = type(attn.processor).__name__
    if processor not in ("AttnProcessor2_0", "AttnProcessor"):
        return (
            f"attention processor {processor} (supported: AttnProcessor2_0, AttnProcessor; call "
            "vae.set_default_attn_processor() or unfuse_qkv_projections() first)"
        )
    if attn.is_cross_attention or attn.spatial_norm is not None or attn.norm_q is not None or (
        attn.norm_k is not None or getattr(attn, "added_kv_proj_dim", None) is not None
    ):
        return "attention with cross-attention, spatial norm or q/k norms"
    return None


def _attention_wrapper(state, attn):
    """Called with the (B, C, h, W) band: local queries, keys and values of every band."""

    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        if x.dim() != 4 or kwargs.get("encoder_hidden_states") is not None or kwargs.get("attention_mask") is not None:
            raise RuntimeError("diffpar VAE split: unexpected attention call (only 4-D self-attention is split)")
        batch, channels, rows, width = x.shape
        tokens = x.view(batch, channels, rows * width).transpose(1, 2)
        out = attention_over_bands(attn, tokens, (1, rows, width), split, frame_causal=False)
        return out.transpose(1, 2).reshape(batch, channels, rows, width)

    return wrapper


ATTENTION = ModuleRule("local queries, whole keys/values", wrap=_attention_wrapper, refuse=_attention_refuse,
                       gathers_keys=True)


# -- Wan-style causal 3D VAEs (Wan, QwenImage, QwenImage 2.1) -------------------------------------------------
def _prepadded_geometry(conv) -> RowGeometry:
    # conv._padding is (W left, W right, H top, H bottom, T front, T back); its own padding attribute is zero.
    return RowGeometry(conv.kernel_size[1], conv.stride[1], conv.dilation[1], conv._padding[2], conv._padding[3])


def _prepadded_causal_conv_wrapper(state, conv):
    """cat(cache frames, x), then F.pad(W, H, T-front), then conv3d with no padding."""
    geometry = _prepadded_geometry(conv)

    def run(t):
        return nn.Conv3d.forward(conv, t)

    @while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        cache_x = args[1] if len(args) > 1 else kwargs.get("cache_x")
        padding = list(conv._padding)
        if cache_x is not None and padding[4] > 0:
            # The cache holds this band's rows of the previous frames: the halo is exchanged on the extended input,
            # so neighbours' cached rows arrive with their current rows.
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            padding[4] -= cache_x.shape[2]

        def pad_fn(t, top, bottom):
            return F.pad(t, (padding[0], padding[1], top, bottom, padding[4], padding[5]))

        return halo_conv(x, split, geometry, pad_fn, run)

    return wrapper


def _frame_attention_wrapper(state, block):
    """Single-head attention within each frame, 1x1-conv projections, a per-pixel norm."""

    @while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        identity = x
        batch, channels, frames, rows, width = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, rows, width)
        qkv = block.to_qkv(block.norm(x))
        qkv = qkv.reshape(batch * frames, 1, channels * 3, -1).permute(0, 1, 3, 2).contiguous()
        x = single_head_attention_over_bands(qkv, split, rows, width)
        x = x.squeeze(1).permute(0, 2, 1).reshape(batch * frames, channels, rows, width)
        x = block.proj(x)
        x = x.view(batch, frames, channels, rows, width).permute(0, 2, 1, 3, 4)
        return x + identity

    return wrapper


PREPADDED_CAUSAL_CONV = ModuleRule("causal conv3d, zero padding, halo on the cache-extended input",
                                   wrap=_prepadded_causal_conv_wrapper, geometry=_prepadded_geometry)
FRAME_ATTENTION = ModuleRule("per-frame attention, local queries", wrap=_frame_attention_wrapper,
                             gathers_keys=True)
