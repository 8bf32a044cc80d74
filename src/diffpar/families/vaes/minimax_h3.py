"""AutoencoderKLMiniMaxH3 (MiniMax-H3 video): an encoder of reflect-padded causal conv3d, per-frame GroupNorm and
reflect-edge strided downsamplers; a ViT decoder that turns every latent voxel into a token, appends learned
register tokens and one zero token, runs full self-attention with 3-axis RoPE (positions normalised by the whole
clip's size) and projects each token to a pixel block.

The decoder splits exactly by latent rows: each rank keeps the tokens of its band (positions taken from the whole
grid) plus the suffix tokens, and every attention layer gathers the keys and values of every band in whole-clip
order. The suffix tokens' queries see the same keys on every rank, so every rank computes them alike. That is one
key/value gather per layer; the token activations themselves are never gathered."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpar.engines.halo import group_norm_whole_image, pad_rows_at_edges
from diffpar.engines.vae_split import ModuleRule, RowGeometry, halo_conv, while_split
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ROW_LOCAL


# -- encoder ---------------------------------------------------------------------------------------------------
def _causal_conv_geometry(conv) -> RowGeometry:
    return RowGeometry(conv.kernel_size[1], conv.stride[1], conv.dilation[1], conv.spatial_padding)


def _causal_conv_wrapper(state, conv):
    """F.pad(rows and columns, spatial mode) with halo rows, zero frames in front, then the conv with no padding."""
    geometry, pad = _causal_conv_geometry(conv), conv.spatial_padding

    def pad_fn(t, top, bottom):
        if not (pad or top or bottom):
            return t.clone()
        return F.pad(t, (pad, pad, top, bottom, 0, 0), mode=conv.spatial_padding_mode)

    def run(t):
        if conv.temporal_padding > 0:
            t = F.pad(t, (0, 0, 0, 0, conv.temporal_padding, 0), mode="constant")
        return F.conv3d(t, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        return halo_conv(x, split, geometry, pad_fn, run)

    return wrapper


def _frame_group_norm_wrapper(state, norm):
    """GroupNorm of each frame over every band's rows."""

    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        batch, channels, frames, rows, width = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, 1, rows, width)
        x = group_norm_whole_image(x, split, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return x.view(batch, frames, channels, rows, width).permute(0, 2, 1, 3, 4).contiguous()

    return wrapper


def _downsample_wrapper(state, module):
    # F.pad(x, (0, 1, 0, 1, 0, 0), reflect) adds a row only at the image's bottom; the strided conv takes halo rows.
    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        if module.spatial_stride == 2:
            x = pad_rows_at_edges(x, (0, 1, 0, 1, 0, 0), split, mode=module.spatial_padding_mode)
        return module.conv(x)

    return wrapper


# -- ViT decoder -----------------------------------------------------------------------------------------------
def _rotate(t, cos, sin):
    rotary_dim = cos.shape[-1]
    rotary, passed = t[..., :rotary_dim], t[..., rotary_dim:]
    first, second = rotary.chunk(2, dim=-1)
    return torch.cat([rotary * cos + torch.cat([-second, first], dim=-1) * sin, passed], dim=-1)


def _vit_decoder_wrapper(state, decoder):
    """MiniMaxH3VideoViTDecoder3d.forward for this band's tokens (see the module docstring)."""

    @while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        batch, channels, frames, rows, width = x.shape
        sizes = state.last_sizes
        all_rows, first_row = sum(sizes), sum(sizes[:state.rank])
        hidden = decoder.proj_in(x.permute(0, 2, 3, 4, 1).reshape(batch, frames * rows * width, channels))
        band_tokens = hidden.shape[1]
        registers = decoder.register_tokens.expand(batch, -1, -1).to(hidden.dtype)
        hidden = torch.cat([hidden, registers, torch.zeros_like(hidden[:, :1, :])], dim=1)
        grids = [2.0 * (torch.arange(0.5, size, dtype=torch.float32, device=x.device) / size) - 1.0
                 for size in (frames, all_rows, width)]
        grids[1] = grids[1][first_row:first_row + rows]  # the whole clip's row positions, this band's rows
        positions = torch.stack(torch.meshgrid(*grids, indexing="ij"), dim=-1).flatten(0, 2)
        positions = positions.unsqueeze(0).expand(batch, -1, -1)
        positions = torch.cat([positions, positions.new_zeros((batch, decoder.num_register_tokens + 1, 3))], dim=1)
        cos, sin = decoder.rope(positions)
        for block in decoder.transformer_blocks:
            attn = block.attn
            dtype = attn.to_q.weight.dtype
            normed = block.norm1(hidden.float()).to(dtype)
            query = attn.to_q(normed).unflatten(2, (attn.heads, -1))
            key = attn.to_k(normed).unflatten(2, (attn.heads, -1))
            value = attn.to_v(normed).unflatten(2, (attn.heads, -1))
            query = _rotate(attn.norm_q(query.float()).to(query.dtype), cos.to(query.dtype), sin.to(query.dtype))
            key = _rotate(attn.norm_k(key.float()).to(key.dtype), cos.to(key.dtype), sin.to(key.dtype))
            kv = torch.cat([key, value], dim=-1)
            band_kv = kv[:, :band_tokens].reshape(batch, frames, rows, width, -1)
            whole_kv = split.gather(band_kv, dim=2).reshape(batch, frames * all_rows * width, attn.heads, -1)
            kv = torch.cat([whole_kv, kv[:, band_tokens:]], dim=1)
            key, value = kv.split(key.shape[-1], dim=-1)
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
            hidden = hidden + attn.to_out[0](out.transpose(1, 2).flatten(2, 3)) * block.scale1
            normed = block.norm2(hidden.float()).to(dtype)
            hidden = hidden + block.ff(normed) * block.scale2
        hidden = decoder.norm_out(hidden).to(decoder.proj_out.weight.dtype)
        hidden = decoder.proj_out(hidden)[:, :band_tokens]
        p, pt = decoder.patch_size, decoder.patch_size_t
        hidden = hidden.view(batch, frames, rows, width, decoder.out_channels, pt, p, p)
        hidden = hidden.permute(0, 4, 1, 5, 2, 6, 3, 7).contiguous()
        return hidden.reshape(batch, decoder.out_channels, frames * pt, rows * p, width * p)

    return wrapper


def _vit_decoder_refuse(decoder) -> str | None:
    for block in decoder.transformer_blocks:
        processor = block.attn.processor
        if type(processor).__name__ != "MiniMaxH3VideoAttnProcessor":
            return f"attention processor {type(processor).__name__} (supported: MiniMaxH3VideoAttnProcessor)"
        if getattr(processor, "_attention_backend", None) is not None or getattr(
                processor, "_parallel_config", None) is not None:
            return "an attention backend or diffusers' own context parallelism set on the ViT decoder"
    return None


MINIMAX_H3_RULES = {
    **dict.fromkeys(("MiniMaxH3VideoEncoder3d", "MiniMaxH3VideoDownBlock3d", "MiniMaxH3VideoResnetBlock3d"),
                    ROW_LOCAL),
    "MiniMaxH3VideoCausalConv3d": ModuleRule(
        "causal conv3d padding its own rows (reflect), halo", wrap=_causal_conv_wrapper,
        geometry=_causal_conv_geometry,
        refuse=lambda m: f"padding mode {m.spatial_padding_mode!r}"
        if m.spatial_padding_mode not in ("constant", "replicate", "reflect") else None),
    "MiniMaxH3VideoGroupNorm": ModuleRule("per-frame GroupNorm with whole-image statistics",
                                          wrap=_frame_group_norm_wrapper, whole_image_stats=True),
    "MiniMaxH3VideoDownsample3d": ModuleRule("pad the bottom edge (reflect), stride-2 halo conv",
                                             wrap=_downsample_wrapper),
    "MiniMaxH3VideoViTDecoder3d": ModuleRule(
        "ViT decoder: this band's tokens and the suffix tokens, every band's keys and values per layer",
        wrap=_vit_decoder_wrapper, refuse=_vit_decoder_refuse, gathers_keys=True, owns_children=True),
}

register_vae("AutoencoderKLMiniMaxH3", rules=MINIMAX_H3_RULES, video=True)
