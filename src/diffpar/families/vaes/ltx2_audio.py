"""AutoencoderKLLTX2Audio (LTX-2's audio VAE): a 2-D VAE over a mel spectrogram laid out (B, C, time, mel bins),
so the engine's row split (dim -2) is a split along TIME. Its convolutions are causal in time by default
(causality_axis="height": pad 2 rows above, none below), so a band's halo is one-sided: it reads only the rank
above. Per-pixel RMS norms (row-local), stride-2 downsamplers that pad the top (causal) or bottom edge, nearest x2
upsamplers whose causal variant drops the clip's first row after its conv (rank 0's band only), and a decoder that
crops / zero-pads its output to 4 * frames - 3 rows (causal) and `mel_bins` bins: done on the gathered clip's
coordinates here. Attention (mid block or attn_resolutions; in no released config): local queries, keys and values
gathered from every band."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpar.engines.vae_split import (
    ModuleRule,
    RowGeometry,
    halo_conv,
    single_head_attention_over_bands,
    while_split,
)
from diffpar.families.vaes.base import register_vae
from diffpar.families.vaes.rules import ROW_LOCAL

# The decoder's output time is fixed by diffusers from the latent length (LATENT_DOWNSAMPLE_FACTOR in its module).
_TIME_FACTOR = 4


# -- causal conv: F.pad(x, (left, right, top, bottom)), then an unpadded nn.Conv2d ----------------------------
def _causal_conv_geometry(module) -> RowGeometry:
    conv = module.conv
    _, _, top, bottom = module.padding
    return RowGeometry(conv.kernel_size[0], conv.stride[0], conv.dilation[0], top, bottom)


def _causal_conv_wrapper(state, module):
    geometry = _causal_conv_geometry(module)
    left, right = module.padding[0], module.padding[1]

    def pad_fn(t, top, bottom):
        return F.pad(t, (left, right, top, bottom))

    @while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        # pad_top rows come from the rank above (the clip's start gets zeros); causal: nothing from below.
        return halo_conv(x, split, geometry, pad_fn, module.conv)

    return wrapper


def _causal_conv_refuse(module) -> str | None:
    conv = module.conv
    if conv.padding != (0, 0) or conv.padding_mode != "zeros":
        return "an LTX-2 audio causal conv whose inner nn.Conv2d pads itself"
    return None


# -- downsample: F.pad by causality (top rows for causal time), then a stride-2 conv with no padding -----------
_DOWNSAMPLE_PAD = {  # (left, right, top, bottom), as LTX2AudioDownsample.forward pads
    "none": (0, 1, 0, 1), "width": (2, 0, 0, 1), "height": (0, 1, 2, 0), "width-compatibility": (1, 0, 0, 1),
}


def _downsample_geometry(module) -> RowGeometry:
    conv = module.conv
    _, _, top, bottom = _DOWNSAMPLE_PAD[module.causality_axis]
    return RowGeometry(conv.kernel_size[0], conv.stride[0], conv.dilation[0], top, bottom)


def _downsample_wrapper(state, module):
    geometry = _downsample_geometry(module)
    left, right, _, _ = _DOWNSAMPLE_PAD[module.causality_axis]

    def pad_fn(t, top, bottom):
        return F.pad(t, (left, right, top, bottom))

    @while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        return halo_conv(x, split, geometry, pad_fn, module.conv)

    return wrapper


def _downsample_refuse(module) -> str | None:
    if not module.with_conv or module.causality_axis not in _DOWNSAMPLE_PAD:
        return f"an LTX-2 audio downsampler without a conv or with causality_axis={module.causality_axis!r}"
    if module.conv.padding != (0, 0):
        return "an LTX-2 audio downsampler whose conv pads itself"
    return None


# -- upsample: nearest x2 (row-local), a halo conv, then the causal variant drops the clip's first row --------
def _upsample_wrapper(state, module):
    @while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        x = module.conv(x)  # wrapped: the halo comes from the neighbours' upsampled rows
        if module.causality_axis == "height" and split.first:
            x = x[:, :, 1:, :]  # row 0 of the whole clip lives in rank 0's band only
        elif module.causality_axis == "width":
            x = x[:, :, :, 1:]
        return x

    return wrapper


def _upsample_refuse(module) -> str | None:
    if not module.with_conv or module.causality_axis not in ("none", "height", "width", "width-compatibility"):
        return f"an LTX-2 audio upsampler without a conv or with causality_axis={module.causality_axis!r}"
    return None


def _upsampled_rows(decoder, band_rows: int, first: bool) -> int:
    """Output time steps of a band of `band_rows` latent steps: x2 per upsampler, minus one row each (causal) on
    the clip's first band."""
    rows = band_rows
    for _ in range(decoder.num_resolutions - 1):
        rows = 2 * rows - (1 if first and decoder.causality_axis == "height" else 0)
    return rows


# -- decoder: its layers on the band, then the crop / pad to the clip's target size in clip coordinates --------
def _decoder_wrapper(state, decoder):
    @while_split(state, "sample")
    def wrapper(split, sample, args, kwargs):
        sizes = state.last_sizes  # latent time steps per rank in this call (set by the entry wrapper)
        frames = sum(sizes)
        target_time = frames * _TIME_FACTOR
        if decoder.causality_axis is not None:
            target_time = max(target_time - (_TIME_FACTOR - 1), 1)
        target_freq = decoder.mel_bins if decoder.mel_bins is not None else sample.shape[-1]
        h = decoder.conv_in(sample)
        h = decoder.mid.block_1(h, temb=None)
        h = decoder.mid.attn_1(h)
        h = decoder.mid.block_2(h, temb=None)
        for level in reversed(range(decoder.num_resolutions)):
            stage = decoder.up[level]
            for block_idx, block in enumerate(stage.block):
                h = block(h, temb=None)
                if stage.attn:
                    h = stage.attn[block_idx](h)
            if level != 0 and hasattr(stage, "upsample"):
                h = stage.upsample(h)
        out = decoder.conv_out(decoder.non_linearity(decoder.norm_out(h)))
        band_out_rows = [_upsampled_rows(decoder, n, i == 0) for i, n in enumerate(sizes)]
        if out.shape[-2] != band_out_rows[split.rank]:
            raise RuntimeError(f"diffpar LTX-2 audio split: band output of {out.shape[-2]} time steps, expected "
                               f"{band_out_rows[split.rank]} (a bug in the split)")
        start = sum(band_out_rows[: split.rank])
        keep = min(max(target_time - start, 0), out.shape[-2])  # the whole clip is cropped to target_time rows
        out = out[:, : decoder.out_ch, :keep, :target_freq]
        pad_time = max(target_time - sum(band_out_rows), 0) if split.last else 0  # zeros after the clip's last row
        pad_freq = max(target_freq - out.shape[-1], 0)
        if pad_time or pad_freq:
            out = F.pad(out, (0, pad_freq, 0, pad_time))
        return out

    return wrapper


def _decoder_refuse(decoder) -> str | None:
    if decoder.give_pre_end or decoder.tanh_out:
        return "an LTX-2 audio decoder with give_pre_end or tanh_out set"
    return None


def _attention_wrapper(state, block):
    """Single-head attention over every (time, bin) of the spectrogram: this band's queries, every band's keys and
    values (one gather), the same softmax scale (channels ** -0.5, SDPA's default for that head size)."""

    @while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        normed = block.norm(x)  # per pixel, or GroupNorm (wrapped: whole-clip statistics)
        batch, channels, rows, width = x.shape
        qkv = torch.cat([block.q(normed), block.k(normed), block.v(normed)], dim=1)
        qkv = qkv.reshape(batch, 1, 3 * channels, rows * width).transpose(2, 3)
        out = single_head_attention_over_bands(qkv, split, rows, width)
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, rows, width)
        return x + block.proj_out(out)

    return wrapper


LTX2_AUDIO_RULES = {
    # The encoder's plain forward is row-local over its children (no crop); the decoder's crop needs clip coordinates.
    "LTX2AudioEncoder": ROW_LOCAL,
    "LTX2AudioDecoder": ModuleRule("its layers on the band, then the clip's time crop in clip coordinates",
                                   wrap=_decoder_wrapper, refuse=_decoder_refuse),
    "Module": ROW_LOCAL,  # the plain nn.Module()s that hold a level's blocks (never called)
    "LTX2AudioResnetBlock": ROW_LOCAL,  # norms, SiLU, two causal convs, a 1x1 (causal, kernel 1) shortcut
    "LTX2AudioPixelNorm": ROW_LOCAL,  # RMS over the channels of each (time, bin)
    "LTX2AudioCausalConv2d": ModuleRule("causal conv: a one-sided (above) halo in time", wrap=_causal_conv_wrapper,
                                        geometry=_causal_conv_geometry, refuse=_causal_conv_refuse,
                                        owns_children=True),
    "LTX2AudioDownsample": ModuleRule("edge padding by causality, then a stride-2 halo conv",
                                      wrap=_downsample_wrapper, geometry=_downsample_geometry,
                                      refuse=_downsample_refuse, owns_children=True),
    "LTX2AudioUpsample": ModuleRule("nearest x2, a halo conv, the clip's first row dropped on rank 0",
                                    wrap=_upsample_wrapper, refuse=_upsample_refuse),
    "LTX2AudioAttnBlock": ModuleRule("attention over the whole spectrogram: local queries, gathered keys/values",
                                     wrap=_attention_wrapper, gathers_keys=True),
}

register_vae("AutoencoderKLLTX2Audio", rules=LTX2_AUDIO_RULES, video=False)
