"""VAE row split: run a VAE's encoder/decoder on one band of image rows per rank, exactly, driven by rule records.

Every module on an encode/decode path is described by a `ModuleRule` (how it treats a band: its row geometry,
its row stride, the wrapper that runs it on a band, the check that refuses what cannot be split exactly). The
families (`diffpar.families.vaes`) own the records of diffusers' classes and hand the engine a `rule_for(module)`
lookup; this engine walks the paths, plans the split (`plan_row_split`: every check, no collective, no change),
and carries the plan out (`apply_row_split`): the entry forward cuts the input into bands and gathers the output,
the wrapped layers exchange halos (engines/halo.py), reduce norm statistics over the whole image, or gather keys.

The engine knows torch modules and the row-split math; it never names a diffusers class.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from diffpar.mesh import settle_deferred
import torch.nn as nn
import torch.nn.functional as F

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
from diffpar.errors import DiffparError, RankMismatchError, UnsupportedError
from diffpar.patch import Patch

# A band must be at least this many latent rows: every layer's halo (1 row for 3x3 kernels) must come from the
# immediate neighbour, and the edge-row recomputation reads kernel-1 rows of the band itself.
MIN_BAND_ROWS = 2
# Default size rule (vae_split_min_rows=None): split when every rank gets at least this many latent rows. Below it,
# a decode is so small that its ~70 communication calls cost more than the compute they save: on CPU, 2 ranks,
# a Flux.1-shaped VAE broke even near 12 latent rows per rank (docs/bench/vae.md).
DEFAULT_MIN_ROWS_PER_RANK = 16
# How long the per-call handshake waits for the other ranks before raising instead of hanging.
DEFAULT_HANDSHAKE_TIMEOUT_S = 300.0  # ParallelismConfig.timeout_s's default
# Set on a VAE while diffpar splits it: a VAE shared by two pipelines must not be wrapped twice.
SPLIT_STATE_ATTR = "_diffpar_vae_split"


# -- the record ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowGeometry:
    """How a layer's windows run along rows: kernel, stride, dilation and the rows it pads above / below."""

    kernel: int
    stride: int = 1
    dilation: int = 1
    pad_top: int = 0
    pad_bottom: int | None = None  # None: as pad_top

    @property
    def extent(self) -> int:
        """Rows one window reads beyond its first: what a band must hold for its edge recomputation."""
        return self.dilation * (self.kernel - 1)

    @property
    def mixes_rows(self) -> bool:  # dilation matters only with kernel > 1
        return not (self.kernel == 1 and self.stride == 1 and self.pad_top == 0)

    @property
    def bottom(self) -> int:
        return self.pad_top if self.pad_bottom is None else self.pad_bottom


WrapperFactory = Callable[["VaeSplitState", nn.Module], Callable]


@dataclass(frozen=True)
class ModuleRule:
    """Everything diffpar knows about one module class on an encode/decode path, as one record.

    what: how it treats a band, in words (messages, docs).
    wrap: `(state, module) -> wrapper` (wrapt's calling convention, installed by `patch.Patch`) that runs the
        module on this rank's band during a split call (its own forward otherwise); None: the module is row-local
        as it is (pointwise, per-pixel, composes its children).
    geometry: `module -> RowGeometry` for a layer whose windows cross band edges (halo rows, row extent, stride);
        a layer whose geometry mixes no rows (1x1, stride 1, no padding) is left unwrapped.
    row_factor: `module -> int`, how much the layer shrinks rows on an encoder path when that is not a geometry
        stride (space-to-depth, patchify): encode bands are multiples of the product of all factors.
    refuse: `module -> str | None`, why this instance cannot be split exactly (a configuration the rule does not
        cover); None when it can.
    whole_image_stats: it reduces statistics over the whole image (one small all-gather per call).
    gathers_keys: attention whose keys and values come from every band (one gather per call).
    owns_children: its wrapper runs its children itself; they are neither checked nor wrapped.
    """

    what: str
    wrap: WrapperFactory | None = None
    geometry: Callable[[nn.Module], RowGeometry] | None = None
    row_factor: Callable[[nn.Module], int] | None = None
    refuse: Callable[[nn.Module], str | None] | None = None
    whole_image_stats: bool = False
    gathers_keys: bool = False
    owns_children: bool = False

    def but(self, **changes) -> "ModuleRule":
        """This record with some fields changed (a class that is one kind plus its own check or factor)."""
        return replace(self, **changes)

    def row_extent(self, module: nn.Module) -> int:
        return self.geometry(module).extent if self.geometry else 0

    def row_stride(self, module: nn.Module) -> int:
        if self.row_factor is not None:
            return self.row_factor(module)
        return self.geometry(module).stride if self.geometry else 1

    def needs_wrap(self, module: nn.Module) -> bool:
        if self.wrap is None:
            return False
        return self.geometry is None or self.geometry(module).mixes_rows


RuleLookup = Callable[[nn.Module], "ModuleRule | None"]


def rule_in_table(table: dict[str, ModuleRule], module: nn.Module) -> ModuleRule | None:
    """The record of `module` in a class-name table, searched along its MRO. A base class only counts if the
    subclass keeps its forward: a subclass that rewrote forward is a different module nobody has reasoned about."""
    cls = type(module)
    for base in cls.__mro__:
        rule = table.get(base.__name__)
        if rule is None:
            continue
        if base is cls or getattr(cls, "forward", None) is getattr(base, "forward", None):
            return rule
        return None
    return None


def path_modules(part: nn.Module, rule_for: RuleLookup) -> Iterator[tuple[str, nn.Module, ModuleRule | None]]:
    """(qualified name, module, rule) for every module on a path, top-down, skipping what a rule owns."""
    stack = [("", part)]
    while stack:
        name, module = stack.pop()
        rule = rule_for(module)
        yield name, module, rule
        if rule is not None and rule.owns_children:
            continue
        children = list(module.named_children())
        for child_name, child in reversed(children):
            stack.append((f"{name}.{child_name}" if name else child_name, child))


def _hooked(module: nn.Module) -> bool:
    """An offloading hook replaced this module's forward (diffusers' group offloading, accelerate's CPU offload)."""
    registry = getattr(module, "_diffusers_hook", None)
    return bool(getattr(registry, "hooks", None)) or hasattr(module, "_hf_hook")


# -- planning --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VaeSplitPlan:
    """What apply_row_split carries out: the parts, the layers to wrap with their records, the band limits."""

    parts: tuple[tuple[str, str], ...]  # (attribute, "decode" / "encode")
    wraps: tuple[tuple[str, str, ModuleRule], ...]  # (part attribute, qualified module name, rule)
    min_band_rows: int
    down_factor: int  # encoder row stride: encode bands are multiples of it
    halo_layers: int
    whole_image_norms: int
    attention_gathers: int


def plan_row_split(vae: nn.Module, parts: list[tuple[str, nn.Module]], rule_for: RuleLookup) -> VaeSplitPlan:
    """Check every module on every part's path and compute what apply needs. No collective, no change."""
    name = type(vae).__name__
    unknown, refused, hooked = [], [], []
    wraps, min_band_rows, down_factor = [], MIN_BAND_ROWS, 1
    halo_layers = norms = gathers = 0
    for part_name, part in parts:
        for sub_name, sub, rule in path_modules(part, rule_for):
            qualified = f"{part_name}.{sub_name}" if sub_name else part_name
            if rule is None:
                unknown.append(f"{qualified} ({type(sub).__name__})")
                continue
            why = rule.refuse(sub) if rule.refuse else None
            if why:
                refused.append(f"{qualified}: {why}")
                continue
            if _hooked(sub):
                hooked.append(qualified)
            min_band_rows = max(min_band_rows, rule.row_extent(sub))
            if part_name == "encoder":
                down_factor *= rule.row_stride(sub)
            if rule.needs_wrap(sub):
                wraps.append((part_name, sub_name, rule))
                halo_layers += rule.geometry is not None
                norms += rule.whole_image_stats
                gathers += rule.gathers_keys
    if unknown:
        raise UnsupportedError(
            f"extra_parallel_modules: {name} has layers diffpar has no row-split rule for: {unknown[:6]}"
            f"{' ...' if len(unknown) > 6 else ''}. Splitting them could silently change the image. Remove the "
            "VAE from extra_parallel_modules (it then decodes whole on every rank), or add a rule for the class "
            "in its VAE's entry under diffpar/families/vaes/ (docs/vae.md)."
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
    return VaeSplitPlan(
        parts=tuple((p, "decode" if p == "decoder" else "encode") for p, _ in parts), wraps=tuple(wraps),
        min_band_rows=min_band_rows, down_factor=down_factor, halo_layers=halo_layers, whole_image_norms=norms,
        attention_gathers=gathers,
    )


def split_state_of(vae: nn.Module) -> "VaeSplitState | None":
    return getattr(vae, SPLIT_STATE_ATTR, None)


def apply_row_split(vae: nn.Module, plan: VaeSplitPlan, group, handle, label: str, min_rows: int | None,
                    timeout_s: float | None = None):
    """Carry out `plan`: mark the VAE, then wrap each part's layers and entry forward, undo recorded first."""
    state = VaeSplitState(vae, group, min_rows, plan.min_band_rows, plan.down_factor, timeout_s)
    handle.add(f"vae {label}: mark as split", lambda: vars(vae).pop(SPLIT_STATE_ATTR, None))
    setattr(vae, SPLIT_STATE_ATTR, state)
    for part_name, kind in plan.parts:
        part = getattr(vae, part_name)
        patches: list[Patch] = []

        def undo(patches=patches):
            for patch in reversed(patches):
                patch.undo()
            patches.clear()

        handle.add(f"vae {label}: {kind} split by rows over {state.world} ranks ({type(part).__name__})", undo)
        for owner, sub_name, rule in plan.wraps:
            if owner != part_name:
                continue
            sub = part.get_submodule(sub_name)
            wrapper = rule.wrap(state, sub)
            patches.append(Patch(sub, "forward", wrapper, label=f"{label}.{part_name}.{sub_name}.forward"))
        arg_name = next(iter(inspect.signature(part.forward).parameters))
        patches.append(Patch(part, "forward", _entry_wrapper(state, kind, arg_name), label=f"{label}.{part_name}"))
    return state


# -- per-call state --------------------------------------------------------------------------------------------
class VaeSplitState:
    """One parallelized VAE: its group, its size rule, and the band split of the call in progress (if any)."""

    def __init__(self, vae: nn.Module, group, min_rows: int | None, min_band_rows: int, down_factor: int,
                 timeout_s: float | None = None):
        self.vae_class = type(vae).__name__
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.min_rows = min_rows
        self.min_band_rows = max(MIN_BAND_ROWS, min_band_rows)
        self.down_factor = down_factor
        self.handshake_timeout_s = float(timeout_s if timeout_s is not None else DEFAULT_HANDSHAKE_TIMEOUT_S)
        self.active: RowSplit | None = None
        self.stats = ExchangeStats()
        self.calls = {"decode": {"split": 0, "whole": 0}, "encode": {"split": 0, "whole": 0}}
        self.last_sizes: list[int] | None = None

    def bands_for(self, x: torch.Tensor, kind: str) -> list[int] | None:
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
        settle_deferred()
        work = dist.all_gather(parts, mine, group=self.group, async_op=True)
        try:
            work.wait(timeout=timedelta(seconds=self.handshake_timeout_s))
        except RuntimeError as exc:
            raise DiffparError(
                f"VAE {kind} on rank {self.rank}: the other ranks did not start the same {kind} within "
                f"{self.handshake_timeout_s:.0f} s. A split {kind} is collective: every rank must call "
                f"vae.{kind}() (every rank runs the pipeline to the end; do not decode on rank 0 only). Set "
                f"ParallelismConfig(timeout_s=...) to wait longer. ({exc})"
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
        x, replace_input = _first_arg(args, kwargs, arg_name)
        if not isinstance(x, torch.Tensor) or x.dim() < 4:
            return wrapped(*args, **kwargs)
        sizes = state.bands_for(x, kind)
        state.handshake(x, kind, sizes is not None)
        if sizes is None:
            state.calls[kind]["whole"] += 1
            return wrapped(*args, **kwargs)
        state.calls[kind]["split"] += 1
        state.last_sizes = sizes
        split = RowSplit(state.group, state.rank, state.world, state.stats)
        start = sum(sizes[: state.rank])
        band = x.narrow(ROW_DIM, start, sizes[state.rank]).contiguous()
        new_args, new_kwargs = replace_input(band)
        state.active = split
        try:
            out = wrapped(*new_args, **new_kwargs)
        finally:
            state.active = None
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            # (output, state for the next call), e.g. CogVideoX's per-frame-batch conv cache: the state is this
            # band's, and the next call (same latent height, so the same bands) hands it back on this rank.
            return (split.gather(out[0], ROW_DIM), *out[1:])
        return split.gather(out, ROW_DIM)

    return wrapper


def while_split(state: VaeSplitState, input_name: str):
    """Turn `body(split, x, args, kwargs)` into a wrapper (wrapt's calling convention) that runs it during a
    split decode/encode (x: the module's input) and the module's own forward otherwise."""

    def deco(body):
        def wrapper(wrapped, instance, args, kwargs):
            split = state.active
            if split is None:
                return wrapped(*args, **kwargs)
            return body(split, args[0] if args else kwargs[input_name], args, kwargs)

        return wrapper

    return deco


def halo_conv(x, split: RowSplit, geometry: RowGeometry, pad, run):
    """A convolution of a band whose padding the caller applies: `pad(t, top, bottom)` pads `t` as the layer does,
    with `top` / `bottom` rows in H; `run(t)` convolves with no row padding. See halo.conv_with_halo."""
    return conv_with_halo(
        x, split, kernel=geometry.kernel, dilation=geometry.dilation, stride=geometry.stride,
        pad_top=geometry.pad_top, pad_bottom=geometry.bottom, pad=pad, run=run,
    )


def conv_geometry(conv: nn.Module) -> RowGeometry:
    """Row geometry of an nn.Conv2d / nn.Conv3d (rows: its second-to-last spatial dim)."""
    i = len(conv.kernel_size) - 2
    padding = conv.padding[i] if not isinstance(conv.padding, str) else 0
    return RowGeometry(conv.kernel_size[i], conv.stride[i], conv.dilation[i], padding)


def conv_wrapper(state: VaeSplitState, conv: nn.Module):
    """nn.Conv2d / nn.Conv3d on a band: the native padded conv with edge rows recomputed when it can (stride 1, zero
    'same' padding), else the halo-padded input convolved with no row padding."""
    geometry = conv_geometry(conv)
    kernel, stride, dilation, pad = geometry.kernel, geometry.stride, geometry.dilation, geometry.pad_top
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
        return halo_conv(x, split, geometry, pad_fn, run_no_padding)

    return wrapper


def group_norm_wrapper(state: VaeSplitState, norm: nn.Module):
    """nn.GroupNorm with statistics of the whole image (halo.group_norm_whole_image)."""

    @while_split(state, "input")
    def wrapper(split, x, args, kwargs):
        return group_norm_whole_image(x, split, norm.num_groups, norm.weight, norm.bias, norm.eps)

    return wrapper


def edge_pad_wrapper(state: VaeSplitState, module: nn.Module):
    """nn.ZeroPad2d / nn.ConstantPad2d: rows padded only at the image's top and bottom."""

    @while_split(state, "input")
    def wrapper(split, x, args, kwargs):
        return pad_rows_at_edges(x, module.padding, split, value=module.value)

    return wrapper


# -- attention over bands --------------------------------------------------------------------------------------
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
        hidden = attn.group_norm(hidden.transpose(1, 2)).transpose(1, 2)  # wrapped: whole-image statistics
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


def single_head_attention_over_bands(qkv: torch.Tensor, split: RowSplit, rows: int, width: int) -> torch.Tensor:
    """Single-head attention of this band's queries over every band's keys, within each image of a batch.

    qkv: (N, 1, h*W, 3C) for this band's h rows (query, key, value channels in that order). Returns (N, 1, h*W, C).
    """
    n, channels = qkv.shape[0], qkv.shape[-1] // 3
    query = qkv[..., :channels]
    kv = qkv[..., channels:].reshape(n, 1, rows, width, 2 * channels)
    kv = split.gather(kv, dim=2).view(n, 1, -1, 2 * channels)
    key, value = kv.split(channels, dim=-1)
    return F.scaled_dot_product_attention(query, key, value)
