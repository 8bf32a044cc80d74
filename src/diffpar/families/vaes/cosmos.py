"""AutoencoderKLCosmos (Cosmos tokenizer CV8x8x8): Haar-wavelet patchify and its inverse, causal conv3d that pads
rows itself (zero padding), per-frame GroupNorm, downsamplers that pad the bottom and right edges before a
stride-2 conv plus a 2x2 average, nearest upsampling, spatial attention within each frame and causal temporal
attention over each pixel's frames."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffpar.engines.halo import pad_rows_at_edges
from diffpar.engines.vae_split import ModuleRule, RowGeometry, halo_conv, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ALIGNED, ROW_LOCAL


def _causal_conv_geometry(conv) -> RowGeometry:
    pad = conv.spatial_pad[2]  # (W left, W right, H top, H bottom): equal on both sides
    return RowGeometry(conv.kernel_size[1], conv.stride[1], conv.dilation[1], pad, pad)


def _causal_conv_wrapper(state, conv):
    """Repeat the first frame for time padding (row-local), then F.pad rows and columns and the conv, with halo."""
    geometry = _causal_conv_geometry(conv)
    left, right = conv.spatial_pad[0], conv.spatial_pad[1]

    def pad_fn(t, top, bottom):
        if conv.pad_mode == "constant":
            return F.pad(t, (left, right, top, bottom, 0, 0), mode="constant", value=0.0)
        return F.pad(t, (left, right, top, bottom, 0, 0), mode=conv.pad_mode)

    def run(t):
        return nn.Conv3d.forward(conv, t)

    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        x = torch.cat([x[:, :, :1].repeat(1, 1, conv.temporal_pad, 1, 1), x], dim=2)
        return halo_conv(x, split, geometry, pad_fn, run)

    return wrapper


def _downsample_wrapper(state, module):
    # F.pad(x, (0, 1, 0, 1, 0, 0)) pads the image's bottom row only; the stride-2 conv reads across band edges
    # (halo), the 2x2 average does not: bands hold whole row pairs (the conv's stride).
    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        if not module.spatial_downsample and not module.temporal_downsample:
            return x
        if module.spatial_downsample:
            x = pad_rows_at_edges(x, (0, 1, 0, 1, 0, 0), split)
            x = module.conv1(x) + F.avg_pool3d(x, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        if module.temporal_downsample:
            x = torch.cat([x[:, :, :1], x], dim=2)
            x = module.conv2(x) + F.avg_pool3d(x, kernel_size=(2, 1, 1), stride=(2, 1, 1))
        return module.conv3(x)

    return wrapper


def _spatial_attention_wrapper(state, attn):
    """Attention within each frame over all its pixels: this band's queries, every band's keys and values."""

    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        if kwargs.get("attention_mask") is not None or len(args) > 1:
            raise RuntimeError("diffpar VAE split: a mask on Cosmos's spatial attention (the model passes none)")
        batch, channels, frames, rows, width = x.shape
        h = attn.norm(x)
        query, key, value = attn.to_q(h), attn.to_k(h), attn.to_v(h)
        kv = split.gather(torch.cat([key, value], dim=1), dim=3)  # (B, 2C, T, all rows, W)
        key, value = kv.split(channels, dim=1)
        heads = attn.num_attention_heads

        def per_frame(t):  # (B, C, T, r, W) -> (B * T, heads, r * W, C // heads)
            return t.permute(0, 2, 3, 4, 1).flatten(2, 3).flatten(0, 1).unflatten(2, (heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(per_frame(query), per_frame(key), per_frame(value))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = out.unflatten(1, (rows, width)).unflatten(0, (batch, frames)).permute(0, 4, 1, 2, 3)
        return attn.to_out[1](attn.to_out[0](out)) + x

    return wrapper


def _attention_refuse(attn) -> str | None:
    name = type(attn.processor).__name__
    if name not in ("CosmosSpatialAttentionProcessor2_0", "CosmosTemporalAttentionProcessor2_0"):
        return f"attention processor {name} (supported: Cosmos's spatial and temporal processors)"
    return None


def _attention_wrapper(state, attn):
    """Spatial attention gathers keys per frame; temporal attention (each pixel's frames) is row-local."""
    spatial = _spatial_attention_wrapper(state, attn)

    def wrapper(wrapped, instance, args, kwargs):
        if type(attn.processor).__name__ == "CosmosSpatialAttentionProcessor2_0":
            return spatial(wrapped, instance, args, kwargs)
        return wrapped(*args, **kwargs)

    return wrapper


COSMOS_RULES = {
    **dict.fromkeys(("CosmosEncoder3d", "CosmosDecoder3d", "CosmosDownBlock3d", "CosmosMidBlock3d",
                     "CosmosUpBlock3d", "CosmosResnetBlock3d", "CosmosCausalGroupNorm", "CosmosConvProjection3d"),
                    ROW_LOCAL),
    # Haar wavelet (stride-2 kernel-2 filters, the reflect-padded row never read on an even band) and its inverse.
    "CosmosPatchEmbed3d": ALIGNED.but(row_factor=lambda m: m.patch_size),
    "CosmosUnpatcher3d": ALIGNED,
    "CosmosCausalConv3d": ModuleRule("causal conv3d that pads its own rows, halo", wrap=_causal_conv_wrapper,
                                     geometry=_causal_conv_geometry,
                                     refuse=lambda m: f"padding mode {m.pad_mode!r}"
                                     if m.pad_mode not in ("constant", "replicate", "reflect") else None),
    # Its stride-2 conv already makes encode bands whole row pairs at this level, which the 2x2 average needs.
    "CosmosDownsample3d": ModuleRule("pad the bottom edge, stride-2 halo conv plus a 2x2 average",
                                     wrap=_downsample_wrapper),
    "CosmosUpsample3d": ROW_LOCAL,  # nearest x2 (repeat_interleave), then halo convs
    "CosmosCausalAttention": ModuleRule("spatial: local queries over every band's keys; temporal: row-local",
                                        wrap=_attention_wrapper, refuse=_attention_refuse, gathers_keys=True),
}

register_vae("AutoencoderKLCosmos", rules=COSMOS_RULES, video=True)
