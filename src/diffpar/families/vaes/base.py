"""VAE parallelism: decode and encode split by image rows over the whole world, exactly.

A VAE listed in `extra_parallel_modules` gets its `decoder.forward` and `encoder.forward` wrapped: the input is
cut into horizontal bands (one per rank, uneven heights allowed), every layer on the path runs on the band with
the rule its class needs (see MODULE_RULES), and the output bands are gathered on every rank. The result equals
the ordinary one-process decode of the same input: the same convolutions on the same rows, GroupNorm statistics
of the whole image, attention over every key. See docs/vae.md.

Because the wrap sits on the inner `decoder` / `encoder` modules, diffusers' own `enable_slicing()` and
`enable_tiling()` keep working: each slice or tile the VAE hands its decoder is itself split over the ranks, and
the result equals that of the same tiled / sliced decode in one process.
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from diffpar.errors import DiffparError, RankMismatchError, UnsupportedError
from diffpar.engines.halo import (
    ROW_DIM,
    ExchangeStats,
    RowSplit,
    collective_device,
    conv_native_with_halo,
    conv_with_halo,
    group_norm_whole_image,
    pad_rows_at_edges,
    row_sizes,
)
from diffpar.patch import Patch
from diffpar.families.registry import ExtraModuleAdapter, register_extra_adapter
from diffpar.plan_types import ComponentPlan

logger = logging.getLogger("diffpar")


# -- family facts ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VaeFamily:
    """What differs between VAE families, as data."""

    parts: tuple[str, ...]  # submodules whose forward receives the (latent or image) tensor to split, by role
    video: bool  # input is (B, C, T, H, W); split is spatial (H), frames and causal caches stay whole per band


_IMAGE = VaeFamily(parts=("encoder", "decoder"), video=False)
_VIDEO = VaeFamily(parts=("encoder", "decoder"), video=True)

FAMILIES: dict[str, VaeFamily] = {
    "AutoencoderKL": _IMAGE,  # SD 1.x/2.x, SDXL, SD3, Flux.1
    "AutoencoderKLFlux2": _IMAGE,  # Flux.2: same Encoder/Decoder, BatchNorm on latents outside the decode path
    "AutoencoderKLQwenImage": _VIDEO,  # Wan 2.1-like causal 3D VAE
    "AutoencoderKLWan": _VIDEO,  # Wan 2.1 / 2.2 (residual blocks, patchify outside the encoder/decoder)
    "AutoencoderKLHunyuanVideo": _VIDEO,  # causal conv3d with replicate padding, GroupNorm, frame-causal attention
    "AutoencoderKLLTXVideo": _VIDEO,  # LTX-Video: per-pixel RMS norms, space-to-depth, patchify inside encoder/decoder
}

# A band must be at least this many latent rows: every layer's halo (1 row for 3x3 kernels) must come from the
# immediate neighbour, and the edge-row recomputation reads kernel-1 rows of the band itself.
MIN_BAND_ROWS = 2
# Default size rule (vae_split_min_rows=None): split when every rank gets at least this many latent rows. Below it,
# a decode is so small that its ~70 communication calls cost more than the compute they save: on CPU, 2 ranks,
# a Flux.1-shaped VAE broke even near 12 latent rows per rank (docs/bench/vae.md).
DEFAULT_MIN_ROWS_PER_RANK = 16
# How long the per-call handshake waits for the other ranks before raising instead of hanging.
HANDSHAKE_TIMEOUT_ENV = "DIFFPAR_VAE_HANDSHAKE_TIMEOUT_S"
DEFAULT_HANDSHAKE_TIMEOUT_S = 600.0


# -- module rules ----------------------------------------------------------------------------------------------
# How each module class on an encode/decode path treats a band. Looked up by class name along the MRO (a base
# class only counts if the subclass keeps its forward). A class not listed makes check() refuse the VAE: a layer
# nobody has reasoned about could mix rows and silently give a wrong image.
ROW_LOCAL = "row-local"  # forward composes children and row-local ops (pointwise, per-pixel, integer nearest upsampling)
ALIGNED = "row-local, stride-aligned"  # space-to-depth / depth-to-space: bands are multiples of the factor
CONV = "halo convolution"
EDGE_PAD = "pad only at the image edges"
GROUP_NORM = "whole-image GroupNorm"
ATTENTION = "local queries, whole keys/values"
DOWNSAMPLE_2D = "pad at image edges, then halo convolution"
CAUSAL_CONV_PREPADDED = "causal conv3d, zero padding, halo on the cache-extended input"
CAUSAL_CONV_REPLICATE = "causal conv3d, replicate padding, halo"
FRAME_ATTENTION = "per-frame attention, local queries"
CAUSAL_MID_BLOCK = "mid block with frame-causal attention, local queries"
NEAREST_UPSAMPLE = "nearest upsampling by an integer factor"

MODULE_RULES: dict[str, str] = {
    # torch
    "ModuleList": ROW_LOCAL, "Sequential": ROW_LOCAL, "Identity": ROW_LOCAL, "Dropout": ROW_LOCAL,
    "SiLU": ROW_LOCAL, "ReLU": ROW_LOCAL, "GELU": ROW_LOCAL, "Mish": ROW_LOCAL, "Tanh": ROW_LOCAL,
    "LeakyReLU": ROW_LOCAL, "Sigmoid": ROW_LOCAL,
    "Linear": ROW_LOCAL,  # on attention tokens or timestep embeddings, never across rows
    "Conv2d": CONV, "Conv3d": CONV,
    "GroupNorm": GROUP_NORM,
    "ZeroPad2d": EDGE_PAD, "ConstantPad2d": EDGE_PAD,
    "Upsample": NEAREST_UPSAMPLE,
    # diffusers, AutoencoderKL / Flux2 (models/autoencoders/vae.py, unets/unet_2d_blocks.py, resnet.py, ...)
    "Encoder": ROW_LOCAL, "Decoder": ROW_LOCAL,
    "UNetMidBlock2D": ROW_LOCAL, "UpDecoderBlock2D": ROW_LOCAL, "DownEncoderBlock2D": ROW_LOCAL,
    "ResnetBlock2D": ROW_LOCAL,  # checked: no up/down inside the block
    "Upsample2D": ROW_LOCAL,  # checked: nearest interpolation, no transposed conv
    "Downsample2D": DOWNSAMPLE_2D,  # F.pad(0, 1, 0, 1) inside forward
    "Attention": ATTENTION,
    # Wan / QwenImage
    "WanEncoder3d": ROW_LOCAL, "WanDecoder3d": ROW_LOCAL, "WanMidBlock": ROW_LOCAL, "WanUpBlock": ROW_LOCAL,
    "WanResidualUpBlock": ROW_LOCAL, "WanResidualDownBlock": ROW_LOCAL, "WanResidualBlock": ROW_LOCAL,
    "WanResample": ROW_LOCAL, "WanRMS_norm": ROW_LOCAL,  # RMS over channels of each pixel
    "WanUpsample": NEAREST_UPSAMPLE, "AvgDown3D": ALIGNED, "DupUp3D": ALIGNED,
    "WanCausalConv3d": CAUSAL_CONV_PREPADDED, "WanAttentionBlock": FRAME_ATTENTION,
    "QwenImageEncoder3d": ROW_LOCAL, "QwenImageDecoder3d": ROW_LOCAL, "QwenImageMidBlock": ROW_LOCAL,
    "QwenImageUpBlock": ROW_LOCAL, "QwenImageResidualBlock": ROW_LOCAL, "QwenImageResample": ROW_LOCAL,
    "QwenImageRMS_norm": ROW_LOCAL, "QwenImageUpsample": NEAREST_UPSAMPLE,
    "QwenImageCausalConv3d": CAUSAL_CONV_PREPADDED, "QwenImageAttentionBlock": FRAME_ATTENTION,
    # HunyuanVideo
    "HunyuanVideoEncoder3D": ROW_LOCAL, "HunyuanVideoDecoder3D": ROW_LOCAL, "HunyuanVideoDownBlock3D": ROW_LOCAL,
    "HunyuanVideoUpBlock3D": ROW_LOCAL, "HunyuanVideoResnetBlockCausal3D": ROW_LOCAL,
    "HunyuanVideoUpsampleCausal3D": ROW_LOCAL,  # nearest interpolation, then a causal conv
    "HunyuanVideoDownsampleCausal3D": ROW_LOCAL,  # a strided causal conv
    "HunyuanVideoCausalConv3d": CAUSAL_CONV_REPLICATE, "HunyuanVideoMidBlock3D": CAUSAL_MID_BLOCK,
    # LTX-Video (0.9.0 / 0.9.5 layouts)
    "LTXVideoEncoder3d": ALIGNED,  # patchify (rows // patch_size) before its first conv
    "LTXVideoDecoder3d": ALIGNED,  # unpatchify after its last conv
    "LTXVideoDownBlock3D": ROW_LOCAL, "LTXVideo095DownBlock3D": ROW_LOCAL, "LTXVideoMidBlock3d": ROW_LOCAL,
    "LTXVideoUpBlock3d": ROW_LOCAL,
    "LTXVideoResnetBlock3d": ROW_LOCAL,  # checked: no spatial noise injection
    "LTXVideoCausalConv3d": ROW_LOCAL,  # pads time by repeating frames, then its inner nn.Conv3d
    "LTXVideoDownsampler3d": ALIGNED, "LTXVideoUpsampler3d": ALIGNED,
    "RMSNorm": ROW_LOCAL, "LayerNorm": ROW_LOCAL,  # over channels (last dim after movedim); checked: 1-D shape
    "PixArtAlphaCombinedTimestepSizeEmbeddings": ROW_LOCAL, "TimestepEmbedding": ROW_LOCAL, "Timesteps": ROW_LOCAL,
}
# Row factors of layers that shrink rows other than by a convolution's stride, on an encoder's main path: bands
# must be multiples of their product. (Wan 2.2's AvgDown3D is a shortcut beside a strided conv: it adds nothing.)
ROW_FACTORS = {
    "LTXVideoDownsampler3d": lambda m: m.stride[1],
    "LTXVideoEncoder3d": lambda m: m.patch_size,
}
# Rules that handle their children themselves (the inner nn.Conv3d of a Hunyuan causal conv must not be patched).
_OWNS_CHILDREN = {CAUSAL_CONV_REPLICATE}


def rule_for(module: nn.Module) -> tuple[str | None, str]:
    """(rule, class name it was found under) for a module; rule None when no class in its MRO is known."""
    cls = type(module)
    for base in cls.__mro__:
        rule = MODULE_RULES.get(base.__name__)
        if rule is None:
            continue
        if base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None):
            return rule, base.__name__
        break
    return None, cls.__name__


def _path_modules(part: nn.Module):
    """(qualified name, module, rule) for every module on a path, top-down, skipping what a rule owns."""
    stack = [("", part)]
    while stack:
        name, module = stack.pop()
        rule, _ = rule_for(module)
        yield name, module, rule
        if rule in _OWNS_CHILDREN:
            continue
        children = list(module.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def _conv_geometry(conv) -> tuple[int, int, int, int]:
    """(kernel, stride, dilation, padding) along rows of an nn.Conv2d / nn.Conv3d."""
    i = len(conv.kernel_size) - 2
    padding = conv.padding[i] if not isinstance(conv.padding, str) else 0
    return conv.kernel_size[i], conv.stride[i], conv.dilation[i], padding


def _mixes_rows(kernel, stride, dilation, pad) -> bool:  # dilation matters only with kernel > 1
    return not (kernel == 1 and stride == 1 and pad == 0)


# -- checks ----------------------------------------------------------------------------------------------------
def _check_module(name: str, module: nn.Module, rule: str) -> str | None:
    """Why this module cannot be split (None when it can)."""
    if rule == CONV:
        if isinstance(module.padding, str):
            return f"{name}: padding={module.padding!r} (string padding) is not supported"
        if module.padding_mode not in ("zeros", "replicate", "reflect"):
            return f"{name}: padding_mode={module.padding_mode!r} wraps rows around the image"
    elif rule == NEAREST_UPSAMPLE:
        scale = module.scale_factor
        scales = scale if isinstance(scale, tuple) else (scale,)
        if module.mode not in ("nearest", "nearest-exact") or module.size is not None or any(
            s is None or float(s) != int(s) for s in scales
        ):
            return f"{name}: {module.mode!r} upsampling by {scale} mixes rows"
    elif rule == ROW_LOCAL and type(module).__name__ == "ResnetBlock2D":
        if module.up or module.down:
            return f"{name}: a ResnetBlock2D with up/down sampling inside"
    elif rule == ROW_LOCAL and type(module).__name__ == "Upsample2D":
        if module.use_conv_transpose or not module.interpolate:
            return f"{name}: Upsample2D with a transposed convolution"
    elif rule == ATTENTION:
        processor = type(module.processor).__name__
        if processor not in ("AttnProcessor2_0", "AttnProcessor"):
            return (
                f"{name}: attention processor {processor} (supported: AttnProcessor2_0, AttnProcessor; call "
                "vae.set_default_attn_processor() or unfuse_qkv_projections() first)"
            )
        if module.is_cross_attention or module.spatial_norm is not None or module.norm_q is not None or (
            module.norm_k is not None or getattr(module, "added_kv_proj_dim", None) is not None
        ):
            return f"{name}: attention with cross-attention, spatial norm or q/k norms"
    elif rule == CAUSAL_CONV_REPLICATE:
        _, _, _, inner_pad = _conv_geometry(module.conv)
        if inner_pad:
            return f"{name}: zero padding inside a replicate-padded causal conv"
    elif type(module).__name__ == "LTXVideoResnetBlock3d" and getattr(module, "per_channel_scale1", None) is not None:
        return f"{name}: spatial noise injection (its noise would depend on the band's shape)"
    elif type(module).__name__ == "LayerNorm" and len(module.normalized_shape) != 1:
        return f"{name}: LayerNorm over {tuple(module.normalized_shape)} (more than channels)"
    return None


def _hooked(module: nn.Module) -> bool:
    """An offloading hook replaced this module's forward (diffusers' group offloading, accelerate's CPU offload)."""
    registry = getattr(module, "_diffusers_hook", None)
    return bool(getattr(registry, "hooks", None)) or hasattr(module, "_hf_hook")


# Set on a VAE while diffpar splits it: a VAE shared by two pipelines must not be wrapped twice.
_STATE_ATTR = "_diffpar_vae_split"


# -- per-call state --------------------------------------------------------------------------------------------
class VaeSplitState:
    """One parallelized VAE: its group, its size rule, and the band split of the call in progress (if any)."""

    def __init__(self, vae: nn.Module, group, min_rows: int | None, min_band_rows: int, down_factor: int):
        self.vae_class = type(vae).__name__
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.min_rows = min_rows
        self.min_band_rows = max(MIN_BAND_ROWS, min_band_rows)
        self.down_factor = down_factor
        self.handshake_timeout_s = float(os.environ.get(HANDSHAKE_TIMEOUT_ENV, DEFAULT_HANDSHAKE_TIMEOUT_S))
        self.active: RowSplit | None = None
        self.stats = ExchangeStats()
        self.calls = {"decode": {"split": 0, "whole": 0}, "encode": {"split": 0, "whole": 0}}
        self.last_sizes: list[int] | None = None

    def plan(self, x: torch.Tensor, kind: str) -> list[int] | None:
        """Band heights for this input, or None to run whole on every rank. Depends on the shape only."""
        height = x.shape[ROW_DIM]
        unit = 1 if kind == "decode" else self.down_factor
        latent_rows = height // unit
        wanted = self.min_rows if self.min_rows is not None else DEFAULT_MIN_ROWS_PER_RANK * self.world
        if latent_rows < max(self.min_band_rows * self.world, wanted):
            return None
        return row_sizes(height, self.world, unit)

    def handshake(self, x: torch.Tensor, kind: str, split: bool) -> None:
        """One small all-gather per call: every rank must be decoding (encoding) the same shape.

        It turns a rank that passes a different shape (which would pick different bands, or no split) into an
        error on every rank, and a rank that never calls decode into an error after the timeout instead of a hang.
        """
        shape = list(x.shape) + [0] * (6 - x.dim())
        mine = torch.tensor(
            [0 if kind == "decode" else 1, int(split), _DTYPES.get(x.dtype, 99), x.dim(), *shape],
            dtype=torch.int64, device=collective_device(self.group),
        )
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        work = dist.all_gather(parts, mine, group=self.group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=self.handshake_timeout_s))
        except RuntimeError as exc:
            raise DiffparError(
                f"VAE {kind} on rank {self.rank}: the other ranks did not start the same {kind} within "
                f"{self.handshake_timeout_s:.0f} s. A split {kind} is collective: every rank must call "
                f"vae.{kind}() (every rank runs the pipeline to the end; do not decode on rank 0 only). Set "
                f"{HANDSHAKE_TIMEOUT_ENV} to wait longer. ({exc})"
            ) from None
        self.stats.calls += 1
        rows = [p.tolist() for p in parts]
        if any(r != rows[0] for r in rows):
            described = "; ".join(
                f"rank {i}: {'decode' if r[0] == 0 else 'encode'} {tuple(r[4:4 + r[3]])} {_DTYPE_NAMES.get(r[2], '?')}"
                for i, r in enumerate(rows)
            )
            raise RankMismatchError(
                f"VAE {kind}: ranks were given different inputs ({described}). Split decoding needs every rank to "
                "decode the same latents (same shape and dtype): run the same pipeline call on every rank, with the "
                "initial latents broadcast (diffpar does this unless broadcast_latents=False)."
            )


_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
_DTYPE_NAMES = {v: str(k).replace("torch.", "") for k, v in _DTYPES.items()}


# -- wrappers --------------------------------------------------------------------------------------------------
def _first_arg(args, kwargs, name):
    if args:
        return args[0], lambda value: ((value, *args[1:]), kwargs)
    value = kwargs[name]
    return value, lambda new: (args, {**kwargs, name: new})


def _entry_wrapper(state: VaeSplitState, kind: str, arg_name: str):
    """The encoder/decoder forward: split the input rows, run the path on this rank's band, gather the output."""

    def wrapper(wrapped, instance, args, kwargs):
        if state.active is not None:
            return wrapped(*args, **kwargs)
        x, replace = _first_arg(args, kwargs, arg_name)
        if not isinstance(x, torch.Tensor) or x.dim() < 4:
            return wrapped(*args, **kwargs)
        sizes = state.plan(x, kind)
        state.handshake(x, kind, sizes is not None)
        if sizes is None:
            state.calls[kind]["whole"] += 1
            return wrapped(*args, **kwargs)
        state.calls[kind]["split"] += 1
        state.last_sizes = sizes
        split = RowSplit(state.group, state.rank, state.world, state.stats)
        start = sum(sizes[: state.rank])
        band = x.narrow(ROW_DIM, start, sizes[state.rank]).contiguous()
        new_args, new_kwargs = replace(band)
        state.active = split
        try:
            out = wrapped(*new_args, **new_kwargs)
        finally:
            state.active = None
        return split.gather(out, ROW_DIM)

    return wrapper


def _while_split(state, input_name: str):
    """Turn `body(split, x, args, kwargs)` into a wrapt wrapper that runs it during a split decode/encode (x: the
    module's input) and the module's own forward otherwise."""

    def deco(body):
        def wrapper(wrapped, instance, args, kwargs):
            split = state.active
            if split is None:
                return wrapped(*args, **kwargs)
            return body(split, args[0] if args else kwargs[input_name], args, kwargs)

        return wrapper

    return deco


def _conv_wrapper(state, conv):
    kernel, stride, dilation, pad = _conv_geometry(conv)
    spatial = len(conv.kernel_size)
    conv_fn = F.conv2d if spatial == 2 else F.conv3d
    unpadded = list(conv.padding)
    unpadded[spatial - 2] = 0
    native = conv.padding_mode == "zeros" and stride == 1 and 2 * pad == dilation * (kernel - 1)

    def run_unpadded(t):
        return conv_fn(t, conv.weight, conv.bias, conv.stride, tuple(unpadded), conv.dilation, conv.groups)

    def run_no_padding(t):
        return conv_fn(t, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)

    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    # F.pad order: last dim first. Rows are the second-to-last dim.
    other = [0] * (2 * spatial)
    other[0] = other[1] = conv.padding[-1]
    if spatial == 3:
        other[4] = other[5] = conv.padding[0]

    def pad_fn(t, top, bottom):
        p = list(other)
        p[2], p[3] = top, bottom
        return F.pad(t, p, mode=mode) if any(p) else t.clone()

    def wrapper(wrapped, instance, args, kwargs):  # explicit: the halo path calls the conv's own forward
        split = state.active
        if split is None:
            return wrapped(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        if native:
            return conv_native_with_halo(
                x, split, kernel=kernel, dilation=dilation, pad=pad, run_padded=lambda t: wrapped(t),
                run_unpadded=run_unpadded,
            )
        return conv_with_halo(
            x, split, kernel=kernel, dilation=dilation, stride=stride, pad_top=pad, pad_bottom=pad, pad=pad_fn,
            run=run_no_padding,
        )

    return wrapper


def _group_norm_wrapper(state, norm):
    @_while_split(state, "input")
    def wrapper(split, x, args, kwargs):
        return group_norm_whole_image(x, split, norm.num_groups, norm.weight, norm.bias, norm.eps)

    return wrapper


def _edge_pad_wrapper(state, module):
    @_while_split(state, "input")
    def wrapper(split, x, args, kwargs):
        return pad_rows_at_edges(x, module.padding, split, value=module.value)

    return wrapper


def _downsample_2d_wrapper(state, module):
    # diffusers' Downsample2D pads (0, 1, 0, 1) with F.pad inside forward when padding == 0: at the image's bottom
    # edge only, so the band above an edge takes its extra row from its neighbour (in the halo conv) instead.
    @_while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        if module.norm is not None:
            x = module.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if module.use_conv and module.padding == 0:
            x = pad_rows_at_edges(x, (0, 1, 0, 1), split)
        return module.conv(x)

    return wrapper


def _prepadded_causal_conv_wrapper(state, conv):
    """Wan / QwenImage causal conv3d: cat(cache frames, x) then F.pad(W, H, T-front) then conv3d with no padding."""
    kernel, stride, dilation = conv.kernel_size[1], conv.stride[1], conv.dilation[1]

    def run(t):
        return nn.Conv3d.forward(conv, t)  # its own padding attribute is (0, 0, 0)

    @_while_split(state, "x")
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

        return conv_with_halo(
            x, split, kernel=kernel, dilation=dilation, stride=stride, pad_top=padding[2], pad_bottom=padding[3],
            pad=pad_fn, run=run,
        )

    return wrapper


def _replicate_causal_conv_wrapper(state, module):
    """HunyuanVideo causal conv: F.pad(replicate) of (W, H, T-front), then an inner conv3d with no padding."""
    kernel, stride, dilation, _ = _conv_geometry(module.conv)
    p = module.time_causal_padding  # (W left, W right, H top, H bottom, T front, T back)

    def pad_fn(t, top, bottom):
        return F.pad(t, (p[0], p[1], top, bottom, p[4], p[5]), mode=module.pad_mode)

    @_while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        return conv_with_halo(
            x, split, kernel=kernel, dilation=dilation, stride=stride, pad_top=p[2], pad_bottom=p[3], pad=pad_fn,
            run=module.conv,
        )

    return wrapper


def attention_over_bands(attn, tokens, layout, split: RowSplit, *, frame_causal: bool):
    """diffusers' VAE `Attention` (self-attention, AttnProcessor2_0 semantics) for this band's tokens.

    tokens: (B, T*h*W, C) in (frame, row, column) order for this band of h rows. Queries are this band's; keys and
    values are gathered from every band into whole-image order, so each query row sees exactly the keys it sees in
    the whole-image computation. `frame_causal`: key frame <= query frame (HunyuanVideo's mid-block mask).
    """
    frames, rows, width = layout
    batch = tokens.shape[0]
    residual = tokens
    hidden = tokens
    if attn.group_norm is not None:
        hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)  # patched: whole-image statistics
    query = attn.to_q(hidden)
    key = attn.to_k(hidden)
    value = attn.to_v(hidden)
    inner = key.shape[-1]
    kv = torch.cat([key, value], dim=-1).view(batch, frames, rows, width, 2 * inner)
    kv = split.gather(kv, dim=2)
    all_rows = kv.shape[2]
    key, value = kv.view(batch, -1, 2 * inner).split(inner, dim=-1)
    heads = attn.heads
    head_dim = inner // heads
    query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    key = key.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    value = value.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    mask = None
    if frame_causal:
        q_frame = torch.arange(frames, device=tokens.device).repeat_interleave(rows * width)
        k_frame = torch.arange(frames, device=tokens.device).repeat_interleave(all_rows * width)
        mask = torch.zeros(q_frame.numel(), k_frame.numel(), dtype=query.dtype, device=tokens.device)
        mask.masked_fill_(k_frame[None, :] > q_frame[:, None], float("-inf"))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
    out = attn.to_out[0](out)
    out = attn.to_out[1](out)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def _attention_wrapper(state, attn):
    """AutoencoderKL's mid-block attention: called with the (B, C, h, W) band."""

    @_while_split(state, "hidden_states")
    def wrapper(split, x, args, kwargs):
        if x.dim() != 4 or kwargs.get("encoder_hidden_states") is not None or kwargs.get("attention_mask") is not None:
            raise RuntimeError("diffpar VAE split: unexpected attention call (only 4-D self-attention is split)")
        batch, channels, rows, width = x.shape
        tokens = x.view(batch, channels, rows * width).transpose(1, 2)
        out = attention_over_bands(attn, tokens, (1, rows, width), split, frame_causal=False)
        return out.transpose(1, 2).reshape(batch, channels, rows, width)

    return wrapper


def _frame_attention_wrapper(state, block):
    """Wan / QwenImage attention block: single-head attention within each frame, 1x1-conv projections."""

    @_while_split(state, "x")
    def wrapper(split, x, args, kwargs):
        identity = x
        batch, channels, frames, rows, width = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, rows, width)
        x = block.norm(x)
        qkv = block.to_qkv(x)
        qkv = qkv.reshape(batch * frames, 1, channels * 3, -1).permute(0, 1, 3, 2).contiguous()
        query = qkv[..., :channels]
        kv = qkv[..., channels:].reshape(batch * frames, 1, rows, width, 2 * channels)
        kv = split.gather(kv, dim=2).view(batch * frames, 1, -1, 2 * channels)
        key, value = kv.split(channels, dim=-1)
        x = F.scaled_dot_product_attention(query, key, value)
        x = x.squeeze(1).permute(0, 2, 1).reshape(batch * frames, channels, rows, width)
        x = block.proj(x)
        x = x.view(batch, frames, channels, rows, width).permute(0, 2, 1, 3, 4)
        return x + identity

    return wrapper


def _causal_mid_block_wrapper(state, block):
    """HunyuanVideo mid block: resnets around attention over all frames' tokens with a frame-causal mask."""

    @_while_split(state, "hidden_states")
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


_WRAPPERS = {
    CONV: _conv_wrapper,
    GROUP_NORM: _group_norm_wrapper,
    EDGE_PAD: _edge_pad_wrapper,
    DOWNSAMPLE_2D: _downsample_2d_wrapper,
    CAUSAL_CONV_PREPADDED: _prepadded_causal_conv_wrapper,
    CAUSAL_CONV_REPLICATE: _replicate_causal_conv_wrapper,
    ATTENTION: _attention_wrapper,
    FRAME_ATTENTION: _frame_attention_wrapper,
    CAUSAL_MID_BLOCK: _causal_mid_block_wrapper,
}


def _needs_patch(module, rule) -> bool:
    if rule == CONV:
        return _mixes_rows(*_conv_geometry(module))
    if rule == CAUSAL_CONV_PREPADDED:
        return _mixes_rows(module.kernel_size[1], module.stride[1], module.dilation[1], module._padding[2])
    return rule in _WRAPPERS


def _row_extent(module, rule) -> int:
    """Rows a layer reads across a band edge, for the minimum band height."""
    if rule == CONV:
        kernel, _, dilation, _ = _conv_geometry(module)
    elif rule == CAUSAL_CONV_PREPADDED:
        kernel, dilation = module.kernel_size[1], module.dilation[1]
    elif rule == CAUSAL_CONV_REPLICATE:
        kernel, _, dilation, _ = _conv_geometry(module.conv)
    else:
        return 0
    return dilation * (kernel - 1)


def _row_stride(module, rule) -> int:
    factor = ROW_FACTORS.get(type(module).__name__)
    if factor is not None:
        return factor(module)
    if rule == CONV:
        return _conv_geometry(module)[1]
    if rule == CAUSAL_CONV_PREPADDED:
        return module.stride[1]
    if rule == CAUSAL_CONV_REPLICATE:
        return _conv_geometry(module.conv)[1]
    return 1


# -- the adapter -----------------------------------------------------------------------------------------------
class VaeAdapter(ExtraModuleAdapter):
    kind = "vae"

    def family(self, module: nn.Module) -> VaeFamily | None:
        for base in type(module).__mro__:
            if base.__name__ in FAMILIES:
                return FAMILIES[base.__name__]
        return None

    def matches(self, module: nn.Module) -> bool:
        return self.family(module) is not None

    def parts(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        family = self.family(module)
        return [(p, getattr(module, p)) for p in family.parts if isinstance(getattr(module, p, None), nn.Module)]

    def plan(self, module: nn.Module, name: str, world_size: int, config) -> ComponentPlan:
        label = name
        name = type(module).__name__
        if getattr(module, _STATE_ATTR, None) is not None:
            raise DiffparError(
                f"extra_parallel_modules: this {name} is already split by diffpar, through another pipeline that "
                "shares it (e.g. one built from pipe.components). Wrapping it twice would split bands again. Call "
                "diffpar.disable_cache(<that pipeline>) first, or leave the VAE out of this one's "
                "extra_parallel_modules: it is split for every pipeline that shares it."
            )
        unknown, refused, hooked = [], [], []
        for part_name, part in self.parts(module):
            for sub_name, sub, rule in _path_modules(part):
                qualified = f"{part_name}.{sub_name}" if sub_name else part_name
                if rule is None:
                    unknown.append(f"{qualified} ({type(sub).__name__})")
                    continue
                why = _check_module(qualified, sub, rule)
                if why:
                    refused.append(why)
                if _hooked(sub):
                    hooked.append(qualified)
        if unknown:
            raise UnsupportedError(
                f"extra_parallel_modules: {name} has layers diffpar has no row-split rule for: {unknown[:6]}"
                f"{' ...' if len(unknown) > 6 else ''}. Splitting them could silently change the image. Remove the "
                "VAE from extra_parallel_modules (it then decodes whole on every rank), or add a rule in "
                "diffpar/adapters/vae.py MODULE_RULES."
            )
        if refused:
            raise UnsupportedError(
                f"extra_parallel_modules: {name} cannot be split by rows exactly: {refused[:4]}. Remove the VAE from "
                "extra_parallel_modules, or change what is named."
            )
        if hooked:
            raise UnsupportedError(
                f"extra_parallel_modules: {name} has offloading hooks on {hooked[:3]} (group offloading or "
                "sequential CPU offload). diffpar wraps those same forwards, and stacking both is not safe. Use "
                "enable_model_cpu_offload() (a hook on the whole VAE is fine), or remove the VAE from "
                "extra_parallel_modules."
            )

        min_band_rows, down_factor = MIN_BAND_ROWS, 1
        for part_name, part in self.parts(module):
            for _, sub, rule in _path_modules(part):
                min_band_rows = max(min_band_rows, _row_extent(sub, rule))
                if part_name == "encoder":
                    down_factor *= _row_stride(sub, rule)
        params = list(module.parameters())
        module_config = dict(getattr(module, "config", {}) or {})
        facts = {
            "class": type(module).__name__,
            "video": self.family(module).video,
            "config": sorted((k, repr(v)) for k, v in module_config.items() if not k.startswith("_")),
            "n_params": sum(p.numel() for p in params),
            "dtype": str(params[0].dtype) if params else None,
        }
        weight_bytes = sum(p.numel() * p.element_size() for p in params)
        parts = [p for p, _ in self.parts(module)]
        return ComponentPlan(
            name=label, role="vae", module_class=name, engine="vae row split", group="world",
            source="diffpar VAE rules",
            details=(
                f"{' and '.join('decode' if p == 'decoder' else 'encode' for p in parts)} split by rows over "
                f"{world_size} ranks, halo exchange at every convolution, whole-image norm statistics",
                f"bands of at least {min_band_rows} rows; encoder row stride {down_factor}",
            ),
            facts=ComponentPlan.freeze_facts(facts),
            weight_bytes=weight_bytes, weight_bytes_per_rank=weight_bytes,
            whole=("weights (replicated: the split is over image rows, not parameters)",),
            payload=(min_band_rows, down_factor),
        )

    def apply(self, module: nn.Module, plan: ComponentPlan, group, handle, config, context):
        label = plan.name or type(module).__name__
        min_band_rows, down_factor = plan.payload
        state = VaeSplitState(module, group, getattr(config, "vae_split_min_rows", None), min_band_rows, down_factor)
        handle.add(f"vae {label}: mark as split", lambda: vars(module).pop(_STATE_ATTR, None))
        setattr(module, _STATE_ATTR, state)
        for part_name, part in self.parts(module):
            patches: list[Patch] = []

            def undo(patches=patches):
                for patch in reversed(patches):
                    patch.undo()
                patches.clear()

            kind = "decode" if part_name == "decoder" else "encode"
            handle.add(f"vae {label}: {kind} split by rows over {state.world} ranks ({type(part).__name__})", undo)
            for sub_name, sub, rule in _path_modules(part):
                if not _needs_patch(sub, rule):
                    continue
                wrapper = _WRAPPERS[rule](state, sub)
                patches.append(Patch(sub, "forward", wrapper, label=f"{label}.{part_name}.{sub_name}.forward"))
            arg_name = next(iter(inspect.signature(part.forward).parameters))
            patches.append(Patch(part, "forward", _entry_wrapper(state, kind, arg_name), label=f"{label}.{part_name}"))
        return state


register_extra_adapter(VaeAdapter())
