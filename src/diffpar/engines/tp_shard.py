"""The one description of a tensor-parallel sharding: what every rank keeps of every split layer.

Every tensor-parallel plan diffpar runs (a transformer's, from diffusers' `_tp_plan` or ours; a text encoder's,
from transformers' `base_model_tp_plan` or ours) is turned, at planning time, into a `ShardPlan` for a given number
of ranks, and `engines/tensor_parallel.py` carries it out. A `ShardPlan` holds, for every rank:

- `layers` (`LayerShard`): a layer replaced by its shard. "column": a Linear keeping the output features in
  `ranges[rank]` (several ranges for a packed projection: one piece of each block, concatenated in order);
  "row": a Linear keeping those input features, followed by one all-reduce and the bias added once;
  "head_table": an Embedding(n, heads) keeping those columns (with `gather_output`: any Embedding split along
  its width, the looked-up rows all-gathered); "channels": a depthwise Conv2d keeping those
  channels (a 1x1 Conv2d is "column" / "row" like a Linear, over channels). `gather_output` (column) all-gathers the full output;
  `input_is_parallel=False` (row) slices the full input first;
- `attributes` (`AttributeShard`): per-rank values of attributes a forward reads (head counts, inner widths);
- `norms` (`NormShard`): RMSNorms or LayerNorms taken over all heads at once, keeping the weight (and bias) of
  this rank's features and all-reducing the sum of squares (LayerNorm: [sum, sum of squares], one all-reduce);
- `heads`: attention module path -> per-rank (query heads, key/value heads), for checks and reports;
- `output_slices` (`OutputSlice`): modules whose tensor outputs each rank narrows to its own columns (a RoPE
  table spanning an attention's whole inner width, applied to the output of a column-split projection);
- `parameters` (`ParameterShard`): modules whose own parameters are sliced, each along one dimension (packed
  mixture-of-experts weights: one 3-D tensor for all experts, split along the hidden width), the module's output
  all-reduced like a row layer's;
- `head_parameters` (`HeadParameterShard`): parameters with one entry per head (a per-head gate), sliced in place
  to this rank's heads, nothing reduced.

Ranges are half-open feature (or head) indices of the full layer and may differ in size between ranks (uneven
splits; key/value heads replicated on the ranks that share them). Everything here is data computed from shapes
alone, so it also works on meta-device models (`ShardPlan.weight_bytes`).

`EvenSplitPlan` is the style vocabulary of transformer plans (diffusers' `_tp_plan` translated, and ours):
module-path globs -> "colwise" / "rowwise" / "colwise_gather" / `Packed`; `even_shard_plan` turns it into a
`ShardPlan`, as evenly as whole heads allow (a rank may hold one head more), refusing only fewer heads than ranks.
Where heads split unevenly, the widths made of no heads (MLP hidden features) are split the other way
(`balanced_free_ranges`): the ranks holding a head more take fewer of those features, so that every rank holds
about the same bytes in all (Ideogram 4, 18 heads at tp 4: 0.263 -> 0.254 of the whole on the largest rank).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from diffpar.errors import DiffparError, UnsupportedError

Range = tuple[int, int]

COLUMN, ROW, HEAD_TABLE, CHANNELS = "column", "row", "head_table", "channels"


# -- the splitter ----------------------------------------------------------------------------------------------
def even_split(total: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous pieces of `total`, differing by at most one (larger pieces first)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def split_ranges(total: int, parts: int) -> list[Range]:
    """Contiguous (start, stop) ranges of `even_split(total, parts)`."""
    ranges, start = [], 0
    for size in even_split(total, parts):
        ranges.append((start, start + size))
        start += size
    return ranges


def block_ranges(blocks: Sequence[int], parts: int) -> list[tuple[Range, ...]]:
    """Per part: one piece of every block of a packed dimension (blocks laid end to end), in block order."""
    out = [[] for _ in range(parts)]
    offset = 0
    for size in blocks:
        for part, (a, b) in enumerate(split_ranges(size, parts)):
            out[part].append((offset + a, offset + b))
        offset += size
    return [tuple(r) for r in out]


def scale_ranges(ranges: Sequence[Range], unit: int, offset: int = 0) -> list[Range]:
    """Head ranges -> feature ranges (`unit` features per head), shifted by `offset`."""
    return [(offset + a * unit, offset + b * unit) for a, b in ranges]


def total(ranges: Sequence[Range]) -> int:
    return sum(b - a for a, b in ranges)


# -- heads -----------------------------------------------------------------------------------------------------
class HeadCountError(DiffparError):
    """Fewer attention heads than ranks: some rank would hold no head."""


@dataclass(frozen=True)
class HeadShard:
    """The query heads and key/value heads one rank computes (half-open ranges of head indices)."""

    q: Range
    kv: Range

    @property
    def num_q(self) -> int:
        return self.q[1] - self.q[0]

    @property
    def num_kv(self) -> int:
        return self.kv[1] - self.kv[0]

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head on this rank (transformers' `num_key_value_groups`)."""
        return self.num_q // self.num_kv


def split_heads(num_heads: int, num_kv_heads: int, world: int, *, what: str = "the model") -> list[HeadShard]:
    """Deal attention heads to `world` ranks so that every rank computes whole heads, exactly.

    Query head h reads key/value head h // g, g = num_heads // num_kv_heads. Every rank's query heads must
    read key/value heads that rank holds, with the same number of query heads per key/value head:
    - num_kv_heads >= world: key/value heads are dealt as evenly as possible, each with its g query heads;
    - num_kv_heads < world (e.g. 2 KV heads on 4 ranks): each rank holds one key/value head (replicated on
      the ranks that share it) and a contiguous part of that head's query heads; `num_key_value_groups`
      becomes the number of local query heads.
    Uneven counts are allowed (a rank may hold one head more); only fewer heads than ranks is refused.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise DiffparError(
            f"{what}: {num_heads} query heads are not a multiple of {num_kv_heads} key/value heads; this is not a "
            "grouped-query attention layout diffpar can split."
        )
    if num_heads < world:
        raise HeadCountError(
            f"{what} has {num_heads} attention heads, fewer than the {world} ranks it would be sharded over: "
            f"tensor parallelism gives every rank at least one whole head, so at most {num_heads} ranks can share "
            f"it. Leave it out of extra_parallel_modules (it then runs whole on every rank), or launch at most "
            f"{num_heads} processes."
        )
    group = num_heads // num_kv_heads
    if num_kv_heads >= world:
        return [HeadShard(q=(a * group, b * group), kv=(a, b)) for a, b in split_ranges(num_kv_heads, world)]
    shards = []
    for kv, ranks_on_head in enumerate(even_split(world, num_kv_heads)):
        # ranks_on_head <= ceil(world / num_kv_heads) <= group because world <= num_heads: no rank is empty.
        for a, b in split_ranges(group, ranks_on_head):
            shards.append(HeadShard(q=(kv * group + a, kv * group + b), kv=(kv, kv + 1)))
    return shards


# -- the description -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShard:
    """Replace the layer at `path` by its shard on each rank."""

    path: str
    kind: str  # COLUMN, ROW, HEAD_TABLE, CHANNELS
    ranges: tuple[tuple[Range, ...], ...]  # rank -> feature ranges (column: outputs; row: inputs; table: heads)
    gather_output: bool = False
    input_is_parallel: bool = True

    def __post_init__(self):
        object.__setattr__(self, "ranges", tuple(tuple(tuple(r) for r in rs) for rs in self.ranges))

    def sizes(self) -> list[int]:
        return [total(r) for r in self.ranges]


@dataclass(frozen=True)
class AttributeShard:
    """Per-rank values of attributes of the module at `path` (head counts, widths its forward reads)."""

    path: str
    values: tuple[dict, ...]  # rank -> {attribute: value}


RMS_NORM, LAYER_NORM = "rms", "layer"


@dataclass(frozen=True)
class NormShard:
    """A norm over all heads at `path`: each rank keeps the weight (and bias) of `ranges[rank]` of its `width`
    features. `kind` RMS_NORM: the sum of squares is all-reduced; LAYER_NORM: [sum, sum of squares] per token, in
    one all-reduce, give the mean and variance over the whole width."""

    path: str
    width: int
    ranges: tuple[tuple[Range, ...], ...]
    kind: str = RMS_NORM

    def counted(self, rank: int) -> tuple[Range, ...]:
        """This rank's features that enter the all-reduced statistics, in its local coordinates: the features no
        lower rank holds (ranks sharing a key/value head hold the same features; each is counted once)."""
        held_below = [r for ranges in self.ranges[:rank] for r in ranges]
        out, offset = [], 0
        for a, b in self.ranges[rank]:
            start = a
            for lo, hi in sorted(held_below):  # walk [a, b) past the parts lower ranks hold
                if hi <= start or lo >= b:
                    continue
                if lo > start:
                    out.append((offset + start - a, offset + lo - a))
                start = max(start, hi)
            if start < b:
                out.append((offset + start - a, offset + b - a))
            offset += b - a
        merged = []  # adjacent local pieces as one range
        for a, b in out:
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return tuple(merged)


@dataclass(frozen=True)
class HeadParameterShard:
    """A parameter `name` of the module at `path` holding one entry per head of an attention along `dim` (Lumina-
    Next's cross-attention gate, applied to that attention's per-head outputs): each rank keeps, in place, the
    entries of its heads `ranges[rank]`; nothing is reduced (every rank applies it to its own heads only)."""

    path: str
    name: str
    dim: int
    ranges: tuple[tuple[Range, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "ranges", tuple(tuple(tuple(r) for r in rs) for rs in self.ranges))


@dataclass(frozen=True)
class OutputSlice:
    """Every tensor the module at `path` returns (a tensor, or each tensor of a tuple) is narrowed along `dim` to
    `ranges[rank]` (concatenated): e.g. a RoPE table (cos, sin) cut to the columns of this rank's heads."""

    path: str
    dim: int
    ranges: tuple[tuple[Range, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "ranges", tuple(tuple(tuple(r) for r in rs) for rs in self.ranges))


@dataclass(frozen=True)
class ParameterShard:
    """The module at `path` keeps, of each own parameter `name`, the indices `ranges[rank]` along `dim`
    (`params`: (name, dim, per-rank ranges)); its output is a partial sum, all-reduced over the ranks (the sliced
    dimension is a hidden width contracted inside the module: gate/up columns and down rows of SwiGLU experts).
    `attributes`: per-rank values of attributes of the module (its local hidden width)."""

    path: str
    params: tuple[tuple[str, int, tuple[tuple[Range, ...], ...]], ...]
    attributes: tuple[dict, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(
            (name, dim, tuple(tuple(tuple(r) for r in rs) for rs in ranges)) for name, dim, ranges in self.params))


@dataclass
class ShardPlan:
    """Every rank's shards of one module on `world` ranks (see the module docstring)."""

    world: int
    source: str  # where the plan came from, for reports: "diffusers _tp_plan", "diffpar TP plan", "T5 plan" ...
    layers: list[LayerShard] = field(default_factory=list)
    attributes: list[AttributeShard] = field(default_factory=list)
    norms: list[NormShard] = field(default_factory=list)
    heads: dict = field(default_factory=dict)  # attention path -> per-rank (q heads, kv heads)
    output_slices: list[OutputSlice] = field(default_factory=list)
    origin: str = ""
    parameters: list[ParameterShard] = field(default_factory=list)  # short name of the plan's author ("diffusers", "diffpar", "transformers" ...)
    head_parameters: list[HeadParameterShard] = field(default_factory=list)

    def summary(self) -> dict:
        head_counts = sorted({tuple(v) for v in self.heads.values()})
        return {"source": self.source, "sharded_layers": len(self.layers), "heads_per_rank": head_counts}

    def uneven(self) -> bool:
        """Whether some split gives ranks different shares (tp does not divide a head count or a width)."""
        shares = [s.sizes() for s in self.layers] + [[total(r) for r in n.ranges] for n in self.norms]
        shares += [[total(r) for r in ranges] for p in self.parameters for _, _, ranges in p.params]
        shares += [[q for q, _ in per_rank] for per_rank in self.heads.values()]
        return any(len(set(share)) > 1 for share in shares)

    def full_heads(self) -> dict[str, int]:
        """Attention path -> its number of query heads in the full model."""
        return {path: sum(q for q, _ in per_rank) for path, per_rank in self.heads.items()}

    def weight_bytes(self, module: torch.nn.Module, bytes_per_element: int | None = None) -> dict:
        """{'full', 'per_rank' (the largest rank's), 'per_rank_all', 'sharded'} parameter bytes, from shapes alone
        (meta-device models work). A row layer keeps its bias whole; a column layer slices it with its rows.
        A quantized weight counts what it really stores (int8 / float8 data and scales, a scale kept whole where
        the cut keeps it whole); `bytes_per_element` counts every element at that size instead."""
        # Imported here, not at the top: this function alone reads quantized storage.
        from diffpar.compat.quantized_tensors import slice_bytes, storage_bytes

        def whole(t: torch.Tensor) -> int:
            return t.numel() * bytes_per_element if bytes_per_element else storage_bytes(t)

        def part(t: torch.Tensor, dim: int, size: int) -> int:
            if bytes_per_element:
                return size * (t.numel() // t.shape[dim]) * bytes_per_element
            return slice_bytes(t, dim, size)

        seen, full = set(), 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                full += whole(p)
        sharded = 0
        kept = [0] * self.world
        for shard in self.layers:
            layer = module.get_submodule(shard.path)
            for name, p in layer.named_parameters(recurse=False):
                sharded += whole(p)
                if shard.kind == ROW and name == "bias":
                    for r in range(self.world):
                        kept[r] += whole(p)
                    continue
                # Sliced along one dimension: weight rows (column), weight columns (row, table), bias entries.
                dim = 0 if shard.kind in (COLUMN, CHANNELS) else (1 if p.dim() > 1 else 0)
                for r, size in enumerate(shard.sizes()):
                    kept[r] += part(p, dim, size)
        for norm in self.norms:
            owner = module.get_submodule(norm.path)
            for key in ("weight", "bias") if norm.kind == LAYER_NORM else ("weight",):
                p = getattr(owner, key, None)
                if p is not None:
                    sharded += whole(p)
                    for r, ranges in enumerate(norm.ranges):
                        kept[r] += part(p, 0, total(ranges))
        for spec in self.head_parameters:
            p = getattr(module.get_submodule(spec.path), spec.name)
            sharded += whole(p)
            for r, ranges in enumerate(spec.ranges):
                kept[r] += part(p, spec.dim, total(ranges))
        for spec in self.parameters:
            owner = module.get_submodule(spec.path)
            for name, dim, ranges in spec.params:
                p = getattr(owner, name)
                sharded += whole(p)
                for r, rs in enumerate(ranges):
                    kept[r] += part(p, dim, total(rs))
        per_rank = [full - sharded + k for k in kept]
        return {"full": full, "per_rank": max(per_rank), "per_rank_all": per_rank, "sharded": sharded}


# -- even splits of transformer plans --------------------------------------------------------------------------
COLWISE, ROWWISE, GATHER, DEPTHWISE = "colwise", "rowwise", "colwise_gather", "depthwise"


@dataclass(frozen=True)
class Packed:
    """A fused Linear sharded block by block. `blocks` are absolute widths along the sharded dimension."""

    kind: str  # COLWISE | ROWWISE | DEPTHWISE
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class ColumnsOf:
    """A plan data style for `EvenSplitPlan.sliced_outputs`: narrow a module's outputs along `dim` to the columns
    this rank keeps of the colwise linear at `linear` (a full module path in the same plan), counted in units of
    `unit` features (1: one table column per feature; head_dim: one table row per head)."""

    linear: str
    dim: int = -1
    unit: int = 1


@dataclass(frozen=True)
class PackedParameters:
    """Plan data for `EvenSplitPlan.reduced_parameters`: parameter name -> (dim, block widths along it), all blocks
    split alike (e.g. experts' gate_up (E, D, 2I): dim 2, blocks (I, I); down (E, I, D): dim 1, blocks (I,)), and
    `width_attribute`: the module attribute holding the hidden width (set per rank)."""

    params: tuple[tuple[str, int, tuple[int, ...]], ...]
    width_attribute: str | None = None


@dataclass
class EvenSplitPlan:
    """A transformer plan in styles: each rank gets an equal share of every split width, give or take one head
    (or one feature, for widths made of no heads; where heads split unevenly, those widths balance the bytes:
    `even_shard_plan`).

    `linears`: module-path glob (one `*` over a ModuleList) -> COLWISE / ROWWISE / GATHER / DEPTHWISE / `Packed`
    (a Linear, or a Conv2d: 1x1 for COLWISE / ROWWISE, depthwise for DEPTHWISE, split by channels; or an
    Embedding as GATHER: split along its width, rows all-gathered);
    `attention_attrs`: attention glob -> attributes (head counts, head-sized widths) divided by the ranks;
    `sharded_norms`: globs of RMSNorms or LayerNorms over all heads (weight and bias split like the heads);
    `sliced_outputs`: module path -> `ColumnsOf` (a RoPE table over the whole inner width of split attentions);
    `reduced_parameters`: module glob -> `PackedParameters` (packed experts: own parameters sliced along a hidden
    width, the output all-reduced);
    `head_parameters`: module glob ("" for the model itself) -> (parameter name, path of an attention under that
    module[, dim]): a parameter with one entry per query head of that attention along `dim` (default 0; Mochi's
    RoPE frequencies, 3 x heads x head_dim/2: 1), each rank keeping its heads' entries.
    """

    linears: dict[str, object]
    attention_attrs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sharded_norms: tuple[str, ...] = ()
    sliced_outputs: dict[str, ColumnsOf] = field(default_factory=dict)
    reduced_parameters: dict[str, "PackedParameters"] = field(default_factory=dict)
    head_parameters: dict[str, tuple] = field(default_factory=dict)


def expand(model: torch.nn.Module, pattern: str) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) for a glob with at most one `*` over a ModuleList."""
    if pattern.count("*") > 1:
        raise ValueError(f"plan key {pattern!r}: one '*' at most")
    if "*" not in pattern:
        return [(pattern, model.get_submodule(pattern))]
    prefix, _, suffix = pattern.partition("*")
    container = model.get_submodule(prefix.rstrip(".")) if prefix.rstrip(".") else model
    suffix = suffix.lstrip(".")
    out = []
    for i, block in enumerate(container):
        path = f"{prefix}{i}" + (f".{suffix}" if suffix else "")
        out.append((path, block.get_submodule(suffix) if suffix else block))
    return out


def _parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def style_blocks(style, linear) -> tuple[str, tuple[int, ...]]:
    """(COLWISE | ROWWISE | GATHER | DEPTHWISE, block widths along the split dimension)."""
    if isinstance(style, Packed):
        return style.kind, tuple(style.blocks)
    if style in (COLWISE, ROWWISE, GATHER, DEPTHWISE):
        if isinstance(linear, torch.nn.Conv2d):
            return style, ((linear.in_channels if style == ROWWISE else linear.out_channels),)
        if isinstance(linear, torch.nn.Embedding):
            if style != GATHER:
                raise DiffparError(f"tensor-parallel plan: an Embedding is split only as {GATHER!r}, not {style!r}")
            return style, (linear.embedding_dim,)
        return style, ((linear.in_features if style == ROWWISE else linear.out_features),)
    raise DiffparError(f"tensor-parallel plan: unknown style {style!r}")


def norm_width(norm, path: str) -> int:
    weight = getattr(norm, "weight", None)
    shape = getattr(norm, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    if weight is not None and weight.dim() == 1:
        return int(weight.shape[0])
    if isinstance(getattr(norm, "dim", None), int):
        return norm.dim
    raise UnsupportedError(f"tensor parallel: cannot tell the width of the norm at {path} ({type(norm).__name__}).")


def _head_count(module) -> int | None:
    """An attention module's query heads: diffusers' `heads`, or `num_heads` (Ideogram 4, Z-Image's own)."""
    for attr in ("heads", "num_heads"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _attention_heads(model, linear_paths) -> dict[str, int]:
    """Attention module path -> heads, for the nearest ancestor with a head count of each split linear."""
    counts = {}
    for path in linear_paths:
        parent = _parent_path(path)
        while parent:
            heads = _head_count(model.get_submodule(parent))
            if heads is not None:
                counts[parent] = heads
                break
            parent = _parent_path(parent)
    return counts


def _key_value_heads(model, attention_paths) -> dict[str, int]:
    """Attention module path -> key/value heads where they are fewer than the query heads (grouped-query attention
    in diffusers' `Attention`: `inner_kv_dim` narrower than `inner_dim`)."""
    counts = {}
    for path in attention_paths:
        attention = model.get_submodule(path)
        inner, inner_kv = getattr(attention, "inner_dim", None), getattr(attention, "inner_kv_dim", None)
        heads = _head_count(attention)
        if isinstance(inner, int) and isinstance(inner_kv, int) and 0 < inner_kv < inner and heads:
            counts[path] = heads * inner_kv // inner
    return counts


@dataclass(frozen=True)
class _AttentionSplit:
    """How one attention's heads are dealt: per-rank query / key-value head ranges, and its head width."""

    heads: int
    kv_heads: int
    head_dim: int | None
    shards: tuple[HeadShard, ...]

    def q_features(self, unit: int) -> list[tuple[Range, ...]]:
        return [((s.q[0] * unit, s.q[1] * unit),) for s in self.shards]

    def kv_features(self, unit: int) -> list[tuple[Range, ...]]:
        return [((s.kv[0] * unit, s.kv[1] * unit),) for s in self.shards]

    def ranges_for(self, width: int) -> list[tuple[Range, ...]] | None:
        """Feature ranges of a width this attention's heads span (q: heads x head_dim; k/v: kv_heads x
        head_dim; or any multiple of the head count), whole heads per rank; None for a width not made of heads."""
        if self.head_dim and width == self.heads * self.head_dim:
            return self.q_features(self.head_dim)
        if self.head_dim and width == self.kv_heads * self.head_dim:
            return self.kv_features(self.head_dim)
        if self.head_dim is None and width % self.heads == 0:  # head width unknown: any multiple of the heads
            return self.q_features(width // self.heads)
        return None


def _head_dim(attention, heads: int) -> int | None:
    inner = getattr(attention, "inner_dim", None)
    if isinstance(inner, int) and inner % heads == 0:
        return inner // heads
    head_dim = getattr(attention, "head_dim", None)
    return head_dim if isinstance(head_dim, int) and not isinstance(head_dim, bool) else None


def _largest_tp(limits: list[int], tp: int, world: int | None) -> int:
    """The largest tp <= `tp` giving every rank a head of every attention (and dividing `world`, if given)."""
    return max(d for d in range(1, tp + 1) if all(d <= n for n in limits) and (world is None or world % d == 0))


# -- free widths against uneven heads --------------------------------------------------------------------------
def feature_granule(width: int, parts: int) -> int:
    """The step of a free width's balanced boundaries: the largest power of two up to 8 dividing `width` that
    leaves 16 steps per part. Shards of a multiple of 8 features keep bf16 rows 16-byte aligned; a coarser step
    would leave up to one step per rank unbalanced (64 features of Ideogram 4's MLP: 0.4% of the model per rank).
    Narrow widths (tiny test models) go down to single features."""
    granule = 8
    while granule > 1 and (width % granule or width // granule < 16 * parts):
        granule //= 2
    return granule


def balanced_free_ranges(loads: Sequence[float], costs: dict[int, int],
                         parts: int) -> dict[int, list[tuple[Range, ...]]]:
    """Per-part contiguous ranges of every free width so that the parts' total bytes come out as equal as
    possible: `loads[r]` is what part r holds besides the free widths (its heads, the replicated rest), `costs[w]`
    the bytes one feature of width w costs a part (summed over every layer splitting that width).

    The water level t with sum(max(t - loads[r], floor)) equal to the free bytes would give part r
    max(t - loads[r], floor) of them (`floor`: one granule of every width, so that no part is empty). In whole
    granules (`feature_granule`): every part after the first takes, of every width, the granules within its
    proportional share, then single granules (costliest widths first) while it stays within t; part 0 takes the
    rest, then hands single granules back to the lightest part while it stays strictly the largest. So part 0,
    which holds the most heads, stays what the plan reports as the per-rank bytes, a granule or two above t.
    A width has one split for every layer of that width: the [gate | up] blocks of a packed projection, which
    share a width, stay paired."""
    granules = {w: feature_granule(w, parts) for w in costs}
    units = {w: w // g for w, g in granules.items()}
    steps = {w: costs[w] * granules[w] for w in costs}  # bytes of one granule of each width
    floor = sum(steps.values())
    free = sum(cost * w for w, cost in costs.items())
    low, high = float(min(loads)), float(max(loads) + free)
    for _ in range(200):  # bisection on the level: the bytes it hands out grow with it
        level = (low + high) / 2
        if sum(max(level - load, floor) for load in loads) < free:
            low = level
        else:
            high = level
    budgets = [max(high - load, floor) for load in loads]
    shares = [budget / sum(budgets) for budget in budgets]
    counts = {w: [0] + [max(1, int(n * share)) for share in shares[1:]] for w, n in units.items()}
    by_cost = sorted(costs, key=steps.__getitem__, reverse=True)
    totals = [load + sum(steps[w] * counts[w][r] for w in costs) for r, load in enumerate(loads)]
    for r in range(1, parts):
        for w in by_cost:
            spare = units[w] - sum(counts[w][1:]) - 1  # part 0 keeps at least one granule
            extra = min(spare, int((high - totals[r]) // steps[w])) if high > totals[r] else 0
            if extra > 0:
                counts[w][r] += extra
                totals[r] += extra * steps[w]
    for w in costs:
        counts[w][0] = units[w] - sum(counts[w][1:])
        if counts[w][0] < 1:  # part 0 would hold next to nothing: keep the even split
            return {w: [((a, b),) for a, b in split_ranges(w, parts)] for w in costs}
    totals[0] = loads[0] + sum(steps[w] * counts[w][0] for w in costs)
    # Parts 1.. fell short of the level by under a granule each, all of it left on part 0: hand granules back to
    # the lightest part, costliest first, while part 0 stays strictly the largest.
    while True:
        r = min(range(1, parts), key=totals.__getitem__)
        w = next((w for w in by_cost if counts[w][0] > 1
                  and totals[0] - steps[w] > max(max(totals[1:]), totals[r] + steps[w])), None)
        if w is None:
            break
        counts[w][0] -= 1
        counts[w][r] += 1
        totals[0] -= steps[w]
        totals[r] += steps[w]
    out = {}
    for w, per_part in counts.items():
        ranges, start = [], 0
        for count in per_part:
            ranges.append(((start * granules[w], (start + count) * granules[w]),))
            start += count
        out[w] = ranges
    return out


def _free_width_costs(model, plan: EvenSplitPlan, expanded, owner, tied_ranges) -> dict[int, int]:
    """Free width -> bytes per feature a rank holds, summed over every split layer and packed parameter of that
    width (as `ShardPlan.weight_bytes` counts them: a row layer's bias stays whole). Widths a gathered layer, a
    sharded norm or a sliced output also splits keep their even split: they are left out."""
    costs: dict[int, int] = {}
    fixed: set[int] = set()
    blocks_of = {}
    for path, layer, kind, blocks in expanded:
        attention = owner(path) if kind not in (GATHER, DEPTHWISE) else None
        free = [w for w in blocks if tied_ranges(w, attention) is None]
        blocks_of[path] = free
        if kind == GATHER:
            fixed.update(free)
            continue
        per_feature = 0
        for pname, p in layer.named_parameters(recurse=False):
            if kind == ROWWISE and pname == "bias":
                continue
            dim = 1 if kind == ROWWISE and p.dim() > 1 else 0
            per_feature += p.numel() // p.shape[dim] * p.element_size()
        for w in free:
            costs[w] = costs.get(w, 0) + per_feature
    for pattern in plan.sharded_norms:
        for path, norm in expand(model, pattern):
            width = norm_width(norm, path)
            if tied_ranges(width, owner(path)) is None:
                fixed.add(width)
    for like in plan.sliced_outputs.values():
        fixed.update(blocks_of.get(like.linear, ()))
    for pattern, packed in plan.reduced_parameters.items():
        for _path, holder in expand(model, pattern):
            for pname, dim, blocks in packed.params:
                p = getattr(holder, pname)
                for w in blocks:
                    if tied_ranges(w, None) is None:
                        costs[w] = costs.get(w, 0) + p.numel() // p.shape[dim] * p.element_size()
    return {w: cost for w, cost in costs.items() if w not in fixed and cost > 0}


def even_shard_plan(model: torch.nn.Module, plan: EvenSplitPlan, tp: int, *, source: str, origin: str,
                    world: int | None = None) -> ShardPlan:
    """`plan` on `tp` ranks as a `ShardPlan`. Local, no collective.

    Attention projections are split at head boundaries (`split_heads`: a rank may hold one head more when tp
    does not divide the head count); row-parallel projections take the matching input features. Widths made of
    no attention's heads (MLP, modulation, channels) are split as evenly as possible, by features. A width equal
    to an attention's query width outside it (a fused [attention | MLP] output projection) follows those heads,
    so both sides of every split width agree. Key/value heads fewer than ranks are held by every rank computing
    their query heads (`split_heads`).

    Where some attention's heads split unevenly, the free widths (made of no heads; MLP hidden features) that only
    column, row and depthwise layers and packed parameters split are split the other way (`balanced_free_ranges`:
    one contiguous range per rank, the same for every layer of that width, so both sides of every split and the
    blocks of packed projections agree), so that the ranks' total bytes come out about equal. Widths that a
    gathered layer, a sharded norm or a sliced output also splits stay even. Heads split evenly: nothing changes.

    Raises UnsupportedError (naming the largest tp that works, within `world` if given) when an attention has
    fewer query heads than ranks."""
    name = type(model).__name__
    expanded = []  # (path, linear, kind, blocks)
    for pattern, style in plan.linears.items():
        for path, linear in expand(model, pattern):
            kind, blocks = style_blocks(style, linear)
            expanded.append((path, linear, kind, blocks))
    heads = _attention_heads(model, [p for p, _, kind, _ in expanded if kind not in (GATHER, DEPTHWISE)])
    for pattern in plan.attention_attrs:
        for path, attn in expand(model, pattern):
            if _head_count(attn) is not None:
                heads.setdefault(path, _head_count(attn))
    kv_heads = _key_value_heads(model, heads)
    works = _largest_tp(list(heads.values()), tp, world)
    few = {p: h for p, h in heads.items() if h < tp}
    if few:
        path, h = next(iter(few.items()))
        raise UnsupportedError(
            f"tp_size={tp} is more than the {h} attention heads of {name} ({path}): tensor parallelism gives each "
            f"rank at least one whole head. The largest tp_size that works for this model is {works}; use it, or "
            "ulysses_size / ring_size for the rest of the ranks."
        )
    splits = {}
    for path, h in heads.items():
        kv = kv_heads.get(path, h)
        splits[path] = _AttentionSplit(h, kv, _head_dim(model.get_submodule(path), h),
                                       tuple(split_heads(h, kv, tp, what=f"{name} ({path})")))
    # Query widths of the attentions -> their split, for layers outside an attention that consume or produce one
    # (dropped where two attentions of one width split it differently: then plain features).
    by_width: dict[int, list] = {}
    for split in splits.values():
        if split.head_dim:
            by_width.setdefault(split.heads * split.head_dim, []).append(split.q_features(split.head_dim))
    head_widths = {w: found[0] for w, found in by_width.items() if all(f == found[0] for f in found)}

    def owner(path: str) -> _AttentionSplit | None:
        parent = _parent_path(path)
        while parent:
            if parent in splits:
                return splits[parent]
            parent = _parent_path(parent)
        return None

    def tied_ranges(width: int, attention: _AttentionSplit | None) -> list[tuple[Range, ...]] | None:
        """Per-rank ranges of a width made of heads: `attention`'s own, else those of the attentions of that query
        width (a layer outside them consuming or producing it); None for a free width (MLP, modulation)."""
        found = attention.ranges_for(width) if attention is not None else None
        return found if found is not None else head_widths.get(width)

    def build(free_ranges: dict[int, list[tuple[Range, ...]]]) -> ShardPlan:
        """The plan, with `free_ranges` (width -> per-rank ranges) for the free widths it names, the rest of them
        split by `split_ranges`."""

        def width_ranges(width: int, attention: _AttentionSplit | None, what: str) -> list[tuple[Range, ...]]:
            if width < tp:
                raise UnsupportedError(f"tp_size={tp} is more than the width {width} {name} splits at {what}: "
                                       f"every rank needs a part. The largest tp_size that works for this model "
                                       f"is {min(works, width)}.")
            found = tied_ranges(width, attention)
            if found is None:  # a free width: one split per width for every layer, so both sides agree
                found = free_ranges.get(width)
            return found if found is not None else [((a, b),) for a, b in split_ranges(width, tp)]

        def packed_ranges(blocks, attention, what) -> tuple[tuple[Range, ...], ...]:
            per_rank = [[] for _ in range(tp)]
            offset = 0
            for width in blocks:
                for r, ranges in enumerate(width_ranges(width, attention, what)):
                    per_rank[r].extend((offset + a, offset + b) for a, b in ranges)
                offset += width
            return tuple(tuple(r) for r in per_rank)

        out = ShardPlan(world=tp, source=source, origin=origin)
        for path, _linear, kind, blocks in expanded:
            attention = owner(path) if kind not in (GATHER, DEPTHWISE) else None
            ranges = packed_ranges(blocks, attention, path)
            if kind == ROWWISE:
                out.layers.append(LayerShard(path, ROW, ranges))
            elif kind == DEPTHWISE:
                out.layers.append(LayerShard(path, CHANNELS, ranges))
            elif isinstance(_linear, torch.nn.Embedding):  # GATHER: a table split along its width, rows gathered
                out.layers.append(LayerShard(path, HEAD_TABLE, ranges, gather_output=True))
            else:
                out.layers.append(LayerShard(path, COLUMN, ranges, gather_output=kind == GATHER))
        for pattern, attrs in plan.attention_attrs.items():
            for path, attn in expand(model, pattern):
                split = splits.get(path)
                values = [{} for _ in range(tp)]
                for attr in attrs:
                    value = getattr(attn, attr, None)
                    if not isinstance(value, int) or isinstance(value, bool):
                        continue
                    per_rank = _attribute_values(attr, value, split)
                    if per_rank is None and value >= tp:  # a width split by features (an MLP's): as its linears are
                        per_rank = [total(r) for r in width_ranges(value, split, f"{path}.{attr}")]
                    if per_rank is None:
                        raise UnsupportedError(
                            f"tp_size={tp}: {path}.{attr}={value} cannot be dealt with the heads of {path} "
                            f"({split.heads if split else '?'} heads). The largest tp_size that works for this "
                            f"model is {works}."
                        )
                    for r, v in enumerate(per_rank):
                        values[r][attr] = v
                if values[0]:
                    out.attributes.append(AttributeShard(path, tuple(values)))
        for pattern in plan.sharded_norms:
            for path, norm in expand(model, pattern):
                width = norm_width(norm, path)
                ranges = width_ranges(width, owner(path), path)
                kind = LAYER_NORM if isinstance(norm, torch.nn.LayerNorm) else RMS_NORM
                out.norms.append(NormShard(path, width, tuple(ranges), kind))
        for pattern, (pname, attention_path, *head_dim_at) in plan.head_parameters.items():
            dim = head_dim_at[0] if head_dim_at else 0
            for path, _holder in expand(model, pattern):
                attention = f"{path}.{attention_path}" if path else attention_path  # "" is the model itself
                split = splits.get(attention)
                if split is None:
                    raise DiffparError(f"tensor-parallel plan: {path}.{pname} follows the heads of "
                                       f"{attention}, which the plan does not split")
                entries = getattr(_holder, pname).shape[dim]
                if entries != split.heads:
                    raise DiffparError(f"tensor-parallel plan: {path}.{pname} has {entries} entries along dim {dim}, "
                                       f"not one per head of the {split.heads} heads of {attention}")
                out.head_parameters.append(HeadParameterShard(path, pname, dim, [(s.q,) for s in split.shards]))
        for pattern, packed in plan.reduced_parameters.items():
            for path, holder in expand(model, pattern):
                params = [(name, dim, packed_ranges(blocks, None, f"{path}.{name}"))
                          for name, dim, blocks in packed.params]
                attributes = ()
                if packed.width_attribute is not None:
                    width = getattr(holder, packed.width_attribute)
                    attributes = tuple({packed.width_attribute: total(r)}
                                       for r in packed_ranges((width,), None, f"{path}.{packed.width_attribute}"))
                out.parameters.append(ParameterShard(path, tuple(params), attributes))
        columns = {s.path: s for s in out.layers if s.kind == COLUMN and not s.gather_output}
        for path, like in plan.sliced_outputs.items():
            shard = columns.get(like.linear)
            if shard is None:
                raise DiffparError(f"tensor-parallel plan: {path} takes the columns of {like.linear}, which the plan "
                                   "does not split colwise")
            if any(a % like.unit or b % like.unit for rs in shard.ranges for a, b in rs):
                raise UnsupportedError(f"tp_size={tp}: the columns of {like.linear} are not whole units of {like.unit} "
                                       f"(the rows of the table {path} returns).")
            ranges = tuple(tuple((a // like.unit, b // like.unit) for a, b in rs) for rs in shard.ranges)
            out.output_slices.append(OutputSlice(path, like.dim, ranges))
        out.heads = {path: [(s.num_q, s.num_kv) for s in split.shards] for path, split in splits.items()}
        return out

    out = build({})
    if all(len({s.num_q for s in split.shards}) == 1 for split in splits.values()):
        return out  # heads split evenly: every free width split evenly too, as ever
    # Heads split unevenly (5, 5, 4, 4 of 18): the ranks holding a head more take fewer features of the free
    # widths, so every rank holds about the same bytes in all.
    costs = _free_width_costs(model, plan, expanded, owner, tied_ranges)
    if not costs:
        return out
    loads = list(out.weight_bytes(model)["per_rank_all"])
    for width, cost in costs.items():
        for r, size in enumerate(even_split(width, tp)):
            loads[r] -= cost * size
    return build(balanced_free_ranges(loads, costs, tp))


def _attribute_values(attr: str, value: int, split: _AttentionSplit | None) -> list[int] | None:
    """Per-rank values of a head count or head-sized width: scaled by each rank's share of the query heads (of the
    key/value heads for an attribute naming them); None when `value` is not made of whole heads."""
    if split is not None:
        if "kv" in attr and value % split.kv_heads == 0:
            return [value // split.kv_heads * s.num_kv for s in split.shards]
        if value % split.heads == 0:
            return [value // split.heads * s.num_q for s in split.shards]
    return None
