"""AutoencoderDC (Sana, Sana-Video's image VAE, PixArt-Sigma DC-AE): 3x3 convs, per-pixel RMS norms, pixel
(un)shuffle resampling with channel-average / repeat shortcuts, and EfficientViT blocks whose multi-scale ReLU linear
attention sums over every pixel of the image.

Linear attention is exact under a row split: the image-wide part is one small sum, V·Kᵀ per head ((head_dim + 1) x
head_dim, the extra row the normaliser), so each rank sums its band's, one all-reduce adds them up, and each rank
applies the total to its own queries (one small all-gather, summed in rank order). Only the order of the float additions differs from the whole decode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpar.engines.vae_split import ModuleRule, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ALIGNED, ROW_LOCAL


def _linear_attention_wrapper(state, attn):
    """SanaMultiscaleLinearAttention on a band (its processor's math, with the image-wide sum all-reduced)."""

    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        residual = x
        batch, _, rows, width = x.shape
        dtype = x.dtype
        h = x.movedim(1, -1)
        qkv = torch.cat([attn.to_q(h), attn.to_k(h), attn.to_v(h)], dim=3).movedim(-1, 1)
        qkv = torch.cat([qkv, *(block(qkv) for block in attn.to_qkv_multiscale)], dim=1)  # depthwise convs: halo
        qkv = qkv.to(torch.float32).reshape(batch, -1, 3 * attn.attention_head_dim, rows * width)
        query, key, value = qkv.chunk(3, dim=2)
        query, key = attn.nonlinearity(query), attn.nonlinearity(key)
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1)  # the normaliser row
        # This band's share of the image-wide sum; every rank adds the shares in rank order (the same sum everywhere).
        scores = split.gather_small(torch.matmul(value, key.transpose(-1, -2))).sum(dim=0)
        out = torch.matmul(scores, query).to(torch.float32)
        out = (out[:, :, :-1] / (out[:, :, -1:] + attn.eps)).to(dtype)
        out = attn.to_out(out.reshape(batch, -1, rows, width).movedim(1, -1)).movedim(-1, 1)
        if attn.norm_type == "rms_norm":
            out = attn.norm_out(out.movedim(1, -1)).movedim(-1, 1)
        else:
            out = attn.norm_out(out)
        return out + residual if attn.residual_connection else out

    return wrapper


def _linear_attention_refuse(attn) -> str | None:
    processor = type(attn.processor).__name__
    if processor != "SanaMultiscaleAttnProcessor2_0":
        return f"attention processor {processor} (supported: SanaMultiscaleAttnProcessor2_0)"
    if attn.norm_type not in ("rms_norm", "batch_norm"):
        return f"norm_type {attn.norm_type!r} after linear attention"
    return None


def _norm_refuse(norm) -> str | None:
    return "BatchNorm2d in training mode (batch statistics over the whole image)" if norm.training else None


DC_RULES = {
    **dict.fromkeys(("Encoder", "Decoder", "ResBlock", "EfficientViTBlock", "GLUMBConv", "RMSNorm"), ROW_LOCAL),
    "BatchNorm2d": ROW_LOCAL.but(refuse=_norm_refuse),  # eval mode: a per-channel affine map
    "SanaMultiscaleAttentionProjection": ROW_LOCAL,  # a depthwise conv (halo) and a grouped 1x1 conv
    "SanaMultiscaleLinearAttention": ModuleRule(
        "ReLU linear attention: band sums of V·Kᵀ all-reduced, local queries", wrap=_linear_attention_wrapper,
        refuse=_linear_attention_refuse, whole_image_stats=True),
    # pixel_unshuffle after a conv (or a stride-2 conv): an encode band must hold whole groups of `factor` rows.
    "DCDownBlock2d": ALIGNED.but(row_factor=lambda m: m.factor if m.downsample else 1),
    "DCUpBlock2d": ALIGNED.but(
        refuse=lambda m: f"{m.interpolation_mode!r} interpolation mixes rows"
        if m.interpolate and m.interpolation_mode not in ("nearest", "nearest-exact") else None),
}

register_vae("AutoencoderDC", rules=DC_RULES, video=False)
