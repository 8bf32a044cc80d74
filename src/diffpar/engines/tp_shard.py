"""The one description of a tensor-parallel sharding: what every rank keeps of every split layer.

Every tensor-parallel plan diffpar runs (a transformer's, from diffusers' `_tp_plan` or ours; a text encoder's,
from transformers' `base_model_tp_plan` or ours) is turned, at planning time, into a `ShardPlan` for a given number
of ranks, and `engines/tensor_parallel.py` carries it out. A `ShardPlan` holds, for every rank:

- `layers` (`LayerShard`): a layer replaced by its shard. "column": a Linear keeping the output features in
  `ranges[rank]` (several ranges for a packed projection: one piece of each block, concatenated in order);
  "row": a Linear keeping those input features, followed by one all-reduce and the bias added once;
  "head_table": an Embedding(n, heads) keeping those columns. `gather_output` (column) all-gathers the full output;
  `input_is_parallel=False` (row) slices the full input first;
- `attributes` (`AttributeShard`): per-rank values of attributes a forward reads (head counts, inner widths);
- `norms` (`NormShard`): RMSNorms taken over all heads at once, keeping the weight of this rank's features and
  all-reducing the mean of squares;
- `heads`: attention module path -> per-rank (query heads, key/value heads), for checks and reports.

Ranges are half-open feature (or head) indices of the full layer and may differ in size between ranks (uneven
splits; key/value heads replicated on the ranks that share them). Everything here is data computed from shapes
alone, so it also works on meta-device models (`ShardPlan.weight_bytes`).

`EvenSplitPlan` is the style vocabulary of transformer plans (diffusers' `_tp_plan` translated, and ours):
module-path globs -> "colwise" / "rowwise" / "colwise_gather" / `Packed`; `even_shard_plan` turns it into a
`ShardPlan`, refusing any width or head count the ranks would not share equally.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from diffpar.errors import DiffparError, UnsupportedError

Range = tuple[int, int]

COLUMN, ROW, HEAD_TABLE = "column", "row", "head_table"


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
    kind: str  # COLUMN, ROW, HEAD_TABLE
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


@dataclass(frozen=True)
class NormShard:
    """An RMSNorm over all heads at `path`: each rank keeps the weight of `ranges[rank]` of its `width` features
    and all-reduces the sum of squares."""

    path: str
    width: int
    ranges: tuple[tuple[Range, ...], ...]


@dataclass
class ShardPlan:
    """Every rank's shards of one module on `world` ranks (see the module docstring)."""

    world: int
    source: str  # where the plan came from, for reports: "diffusers _tp_plan", "diffpar TP plan", "T5 plan" ...
    layers: list[LayerShard] = field(default_factory=list)
    attributes: list[AttributeShard] = field(default_factory=list)
    norms: list[NormShard] = field(default_factory=list)
    heads: dict = field(default_factory=dict)  # attention path -> per-rank (q heads, kv heads)
    origin: str = ""  # short name of the plan's author ("diffusers", "diffpar", "transformers" ...)

    def summary(self) -> dict:
        head_counts = sorted({tuple(v) for v in self.heads.values()})
        return {"source": self.source, "sharded_layers": len(self.layers), "heads_per_rank": head_counts}

    def full_heads(self) -> dict[str, int]:
        """Attention path -> its number of query heads in the full model."""
        return {path: sum(q for q, _ in per_rank) for path, per_rank in self.heads.items()}

    def weight_bytes(self, module: torch.nn.Module, bytes_per_element: int | None = None) -> dict:
        """{'full', 'per_rank' (the largest rank's), 'per_rank_all', 'sharded'} parameter bytes, from shapes alone
        (meta-device models work). A row layer keeps its bias whole; a column layer slices it with its rows."""

        def nbytes(numel: int, t: torch.Tensor) -> int:
            return numel * (bytes_per_element or t.element_size())

        seen, full = set(), 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                full += nbytes(p.numel(), p)
        sharded = 0
        kept = [0] * self.world
        for shard in self.layers:
            layer = module.get_submodule(shard.path)
            for name, p in layer.named_parameters(recurse=False):
                sharded += nbytes(p.numel(), p)
                if shard.kind == ROW and name == "bias":
                    for r in range(self.world):
                        kept[r] += nbytes(p.numel(), p)
                    continue
                # Sliced along one dimension: weight rows (column), weight columns (row, table), bias entries.
                dim = 0 if shard.kind == COLUMN else (1 if p.dim() > 1 else 0)
                other = p.numel() // p.shape[dim]
                for r, size in enumerate(shard.sizes()):
                    kept[r] += nbytes(size * other, p)
        for norm in self.norms:
            weight = getattr(module.get_submodule(norm.path), "weight", None)
            if weight is not None:
                sharded += nbytes(weight.numel(), weight)
                for r, ranges in enumerate(norm.ranges):
                    kept[r] += nbytes(total(ranges), weight)
        per_rank = [full - sharded + k for k in kept]
        return {"full": full, "per_rank": max(per_rank), "per_rank_all": per_rank, "sharded": sharded}


# -- even splits of transformer plans --------------------------------------------------------------------------
COLWISE, ROWWISE, GATHER = "colwise", "rowwise", "colwise_gather"


@dataclass(frozen=True)
class Packed:
    """A fused Linear sharded block by block. `blocks` are absolute widths along the sharded dimension."""

    kind: str  # COLWISE | ROWWISE
    blocks: tuple[int, ...]


@dataclass
class EvenSplitPlan:
    """A transformer plan in styles: each rank gets an equal share of every split width.

    `linears`: module-path glob (one `*` over a ModuleList) -> COLWISE / ROWWISE / GATHER / `Packed`;
    `attention_attrs`: attention glob -> attributes (head counts, head-sized widths) divided by the ranks;
    `sharded_norms`: globs of RMSNorms over all heads (their weight is split like the heads).
    """

    linears: dict[str, object]
    attention_attrs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sharded_norms: tuple[str, ...] = ()


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
    """(COLWISE | ROWWISE | GATHER, block widths along the split dimension)."""
    if isinstance(style, Packed):
        return style.kind, tuple(style.blocks)
    if style in (COLWISE, ROWWISE, GATHER):
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


def _divisors_up_to(n: int, limit: int) -> list[int]:
    return [d for d in range(1, limit + 1) if n % d == 0]


def _attention_heads(model, linear_paths) -> dict[str, int]:
    """Attention module path -> heads, for the nearest ancestor with an int `heads` of each split linear."""
    counts = {}
    for path in linear_paths:
        parent = _parent_path(path)
        while parent:
            heads = getattr(model.get_submodule(parent), "heads", None)
            if isinstance(heads, int):
                counts[parent] = heads
                break
            parent = _parent_path(parent)
    return counts


def _key_value_heads(model, attention_paths) -> dict[str, int]:
    """Attention module path -> key/value heads where they are fewer than the query heads (grouped-query attention
    in diffusers' `Attention`: `inner_kv_dim` narrower than `inner_dim`). Splitting K/V projections by width alone
    would cut through a head when tp does not divide these."""
    counts = {}
    for path in attention_paths:
        attention = model.get_submodule(path)
        inner, inner_kv = getattr(attention, "inner_dim", None), getattr(attention, "inner_kv_dim", None)
        if isinstance(inner, int) and isinstance(inner_kv, int) and 0 < inner_kv < inner:
            counts[path] = attention.heads * inner_kv // inner
    return counts


def even_shard_plan(model: torch.nn.Module, plan: EvenSplitPlan, tp: int, *, source: str, origin: str,
                    world: int | None = None) -> ShardPlan:
    """`plan` on `tp` ranks as a `ShardPlan`. Local, no collective; raises UnsupportedError (naming the largest tp
    that works, within `world` if given) when a head count or a split width does not divide by `tp`."""
    name = type(model).__name__
    expanded = []  # (path, linear, kind, blocks)
    for pattern, style in plan.linears.items():
        for path, linear in expand(model, pattern):
            kind, blocks = style_blocks(style, linear)
            expanded.append((path, linear, kind, blocks))
    heads = _attention_heads(model, [p for p, _, kind, _ in expanded if kind != GATHER])
    widths = [(f"{path} ({'rowwise' if kind == ROWWISE else 'colwise'}, width {b})", b)
              for path, _, kind, blocks in expanded for b in blocks]
    kv_heads = _key_value_heads(model, heads)
    constraints = sorted(set(heads.values()) | set(kv_heads.values()) | {w for _, w in widths})
    works = max(d for d in range(1, tp + 1)
                if all(c % d == 0 for c in constraints) and (world is None or world % d == 0))
    bad_kv = {p: h for p, h in kv_heads.items() if h % tp}
    if bad_kv:
        path, h = next(iter(bad_kv.items()))
        raise UnsupportedError(
            f"tp_size={tp} does not divide the {h} key/value heads of {name} ({path}, grouped-query attention with "
            f"{heads[path]} query heads): tensor parallelism gives each rank whole key/value heads. The largest "
            f"tp_size that works for this model is {works}; use it, or ulysses_size / ring_size for the rest of the "
            "ranks."
        )
    bad_heads = {p: h for p, h in heads.items() if h % tp}
    if bad_heads:
        path, h = next(iter(bad_heads.items()))
        raise UnsupportedError(
            f"tp_size={tp} does not divide the {h} attention heads of {name} ({path}): tensor "
            f"parallelism gives each rank whole heads. The largest tp_size that works for this model is {works} "
            f"(heads {h} divide by {_divisors_up_to(h, tp)}{f', world {world}' if world else ''}); use it, "
            "or ulysses_size / ring_size for the rest of the ranks."
        )
    bad_widths = [what for what, w in widths if w % tp]
    if bad_widths:
        raise UnsupportedError(
            f"tp_size={tp} does not divide a width {name} splits: {bad_widths[0]}"
            f"{f' (and {len(bad_widths) - 1} more)' if len(bad_widths) > 1 else ''}. Each rank must get an equal "
            f"slice. The largest tp_size that works for this model is {works}."
        )
    out = ShardPlan(world=tp, source=source, origin=origin)
    for path, _linear, kind, blocks in expanded:
        ranges = block_ranges(blocks, tp)
        if kind == ROWWISE:
            out.layers.append(LayerShard(path, ROW, ranges))
        else:
            out.layers.append(LayerShard(path, COLUMN, ranges, gather_output=kind == GATHER))
    for pattern, attrs in plan.attention_attrs.items():
        for path, attn in expand(model, pattern):
            values = {}
            for attr in attrs:
                value = getattr(attn, attr, None)
                if not isinstance(value, int) or isinstance(value, bool):
                    continue
                if value % tp:
                    raise UnsupportedError(
                        f"tp_size={tp}: {path}.{attr}={value} is not divisible by it. The largest tp_size "
                        f"that works for this model is {works}."
                    )
                values[attr] = value // tp
            if values:
                out.attributes.append(AttributeShard(path, tuple(dict(values) for _ in range(tp))))
    for pattern in plan.sharded_norms:
        for path, norm in expand(model, pattern):
            width = norm_width(norm, path)
            if width % tp:
                raise UnsupportedError(f"tp_size={tp} does not divide the width {width} of the norm at {path}.")
            out.norms.append(NormShard(path, width, tuple((r,) for r in split_ranges(width, tp))))
    out.heads = {path: [(h // tp, h // tp)] * tp for path, h in heads.items()}
    return out
