"""Quantized weight tensors (torchao tensor subclasses): how a weight of a known layout is sliced and put back.

Tensor parallelism cuts every weight it splits into ranges along one dimension (rows for a column-parallel layer,
columns for a row-parallel one). For a plain tensor that is `narrow` (+ `cat` for packed blocks). A quantized
weight is a wrapper tensor holding inner tensors (torchao: `qdata` laid out like the weight, a `scale` per block of
`block_size`); slicing it must slice those inner tensors consistently, so that the shard is a piece of the *same*
quantized weight (never re-quantized: a row-parallel shard re-quantized on its own would get other scales).

The rule, for one dimension `dim` of the weight:
- an element-wise inner tensor (`qdata`) is cut like the weight;
- a per-block inner tensor (`scale`, `zero_point`) is cut like the weight where one block is one element along
  `dim` (size along `dim` equals the weight's: per-row scales under a row cut), and kept whole where one block spans
  the whole dimension (size 1: the per-row scale under a column cut), `block_size[dim]` then becoming the new width;
- anything else (group-wise blocks across `dim`, activation statistics, an unknown subclass) is refused by name.

`LAYOUTS` is the table of subclasses whose layout diffpar knows, keyed by class name (the library is detected by
the object, never imported here: torchao is optional). Every engine slicing a weight goes through `map_along`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass(frozen=True)
class Layout:
    """What diffpar knows of one tensor subclass's inner tensors (names from its `__tensor_flatten__`)."""

    library: str
    elementwise: tuple[str, ...]  # laid out like the weight itself
    per_block: tuple[str, ...]  # one value per block of the attribute `block_size`
    # attribute -> why a set (not None) value stops an exact split along the input dimension (dim 1 of a Linear):
    # the input of a row-parallel shard is only this rank's features
    inexact_along_input: tuple[tuple[str, str], ...] = ()
    # attribute -> why a set value is refused whatever the dimension
    refused_when_set: tuple[tuple[str, str], ...] = ()


_ACTIVATION_QUANT = ("act_quant_kwargs", "it quantizes each activation row with one scale taken over the whole row, "
                     "and a row-parallel shard sees only its part of the row (a different scale: not the same model)")

LAYOUTS: dict[str, Layout] = {
    # torchao >= 0.13 `Int8WeightOnlyConfig(version=2)` / `Int8DynamicActivationInt8WeightConfig`: int8 `qdata`
    # (out x in), `scale` and `zero_point` per block (per output row by default: block_size [1, in]).
    "Int8Tensor": Layout(
        "torchao", ("qdata",), ("scale", "zero_point"),
        inexact_along_input=(_ACTIVATION_QUANT,),
        refused_when_set=(
            ("act_quant_scale", "static activation scales are calibrated over whole rows"),
            ("act_quant_zero_point", "static activation zero points are calibrated over whole rows"),
            ("act_pre_scale", "a per-input-feature pre-scale (AWQ / SmoothQuant) has no slicing rule in diffpar"),
        ),
    ),
    # torchao `Float8WeightOnlyConfig` / `Float8DynamicActivationFloat8WeightConfig`: float8 `qdata` (out x in),
    # `scale` per block (per row with PerRow(), one for the tensor with PerTensor()).
    "Float8Tensor": Layout("torchao", ("qdata",), ("scale",), inexact_along_input=(_ACTIVATION_QUANT,)),
}


class QuantizedLayoutError(ValueError):
    """A weight diffpar cannot slice exactly; the message says which and why."""


def is_plain(tensor: torch.Tensor) -> bool:
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    return type(data) is torch.Tensor


def _data(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor


def layout_name(tensor: torch.Tensor) -> str:
    """"Int8Tensor (torchao)" for a known subclass, else the class and its module."""
    cls = type(_data(tensor))
    known = LAYOUTS.get(cls.__name__)
    return f"{cls.__name__} ({known.library})" if known else f"{cls.__name__} (from {cls.__module__})"


def refusal(tensor: torch.Tensor, dim: int) -> str | None:
    """Why `tensor` cannot be cut exactly along `dim`, or None (a plain tensor, or a known layout that allows it).
    Local and cheap: planning calls it for every weight tensor parallelism splits, before anything changes."""
    data = _data(tensor)
    if type(data) is torch.Tensor:
        return None
    name = type(data).__name__
    layout = LAYOUTS.get(name)
    if layout is None or not hasattr(data, "__tensor_flatten__"):
        known = ", ".join(f"{k} ({v.library})" for k, v in LAYOUTS.items())
        return (f"its weight is a tensor subclass with no slicing rule in diffpar: {layout_name(data)} (known: "
                f"{known}); other quantization layouts (torchao int4 / mx / intx, bitsandbytes, GGUF) are not split")
    for attr, why in layout.refused_when_set:
        if getattr(data, attr, None) is not None:
            return f"its weight ({layout_name(data)}) has {attr} set: {why}"
    if dim == data.dim() - 1:
        for attr, why in layout.inexact_along_input:
            if getattr(data, attr, None) is not None:
                return f"its weight ({layout_name(data)}) has {attr} set and is split along its input: {why}"
    names, attrs = data.__tensor_flatten__()
    block = attrs.get("block_size") if isinstance(attrs, dict) else None
    for inner_name in names:
        if inner_name in layout.elementwise:
            continue
        if inner_name not in layout.per_block:
            return f"its weight ({layout_name(data)}) holds {inner_name!r}, an inner tensor diffpar has no rule for"
        inner = getattr(data, inner_name)
        if inner.dim() != data.dim():
            return (f"its weight ({layout_name(data)}) has a {inner_name} of {inner.dim()} dimensions for a "
                    f"{data.dim()}-dimensional weight; diffpar has no rule for that")
        size = inner.shape[dim]
        if size not in (1, data.shape[dim]) or (size == 1 and block is not None and block[dim] != data.shape[dim]
                                                and data.shape[dim] != 1):
            return (f"its weight ({layout_name(data)}) is quantized in groups along dimension {dim} (block_size "
                    f"{list(block) if block is not None else '?'}, {inner_name} {tuple(inner.shape)}): diffpar splits "
                    "only per-row or per-tensor scales")
    return None


def _cut_with_weight(layout: Layout, inner_name: str, inner: torch.Tensor, dim: int, size: int, block) -> bool:
    """Whether an inner tensor is cut with the weight along `dim` (else it is kept whole): element-wise data, and
    per-block values where one block is one element along `dim` (block_size says so when the size is 1 too)."""
    return inner_name in layout.elementwise or (inner.shape[dim] == size and (block is None or block[dim] == 1))


def map_along(tensor: torch.Tensor, dim: int, cut: Callable[[torch.Tensor, int], torch.Tensor],
              new_size: int | None = None) -> torch.Tensor:
    """`cut(t, dim)` applied to `tensor` (a plain tensor: to itself) or, for a known quantized layout, to each inner
    tensor laid out along `dim`, the others copied whole, then the wrapper rebuilt. `cut` may shrink (a shard) or
    grow (a gather) the dimension; `new_size` is the weight's size along `dim` afterwards (default: what `cut`
    gave the element-wise data). The caller has checked `refusal(tensor, dim)` at planning time; it is checked
    again here so a wrong call fails loudly instead of computing with wrong scales."""
    data = _data(tensor)
    if type(data) is torch.Tensor:
        return cut(data, dim)
    reason = refusal(data, dim)
    if reason is not None:
        raise QuantizedLayoutError(reason)
    layout = LAYOUTS[type(data).__name__]
    names, attrs = data.__tensor_flatten__()
    old_size = data.shape[dim]
    inner = {}
    attrs = dict(attrs)
    block = attrs.get("block_size")
    for inner_name in names:
        t = getattr(data, inner_name)
        inner[inner_name] = cut(t, dim) if _cut_with_weight(layout, inner_name, t, dim, old_size, block) else t.clone()
    size = inner[layout.elementwise[0]].shape[dim] if new_size is None else new_size
    if block is not None and block[dim] == old_size != 1 and size == 1:
        # block_size would read as per-element and a later gather would cut the whole-row scale: refuse instead
        raise QuantizedLayoutError(f"{layout_name(data)} cut to one element along dimension {dim}: diffpar needs "
                                   "at least two per rank to keep its block layout unambiguous")
    if block is not None and block[dim] == old_size:  # one block spanned the dimension: it still does
        block = list(block)
        block[dim] = size
        attrs["block_size"] = block
    shape = list(data.shape)
    shape[dim] = size
    rebuilt = type(data).__tensor_unflatten__(inner, attrs, torch.Size(shape), None)
    return rebuilt


def cut_ranges(tensor: torch.Tensor, dim: int, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The ranges of `tensor` along `dim`, concatenated, as a copy with its own storage (so the full weight can be
    freed): plain tensors and known quantized layouts alike. The one slicing function of tensor parallelism."""

    def cut(t: torch.Tensor, d: int) -> torch.Tensor:
        parts = [t.narrow(d, a, b - a) for a, b in ranges]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=d)
        return out.clone(memory_format=torch.contiguous_format)

    return map_along(tensor, dim, cut)


def inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `tensor`'s values (itself, or a subclass's inner tensors, recursively)."""
    data = _data(tensor)
    if type(data) is torch.Tensor or not hasattr(data, "__tensor_flatten__"):
        return [data]
    names, _ = data.__tensor_flatten__()
    return [t for n in names for t in inner_tensors(getattr(data, n))]


def storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight really holds (a quantized one: its int8 / float8 data and scales)."""
    return sum(t.numel() * t.element_size() for t in inner_tensors(tensor))


def slice_bytes(tensor: torch.Tensor, dim: int, size: int) -> int:
    """Bytes a cut of `size` elements of `tensor` along `dim` really holds, from shapes alone (what `cut_ranges`
    would give: a quantized weight's data cut with it, its per-block values cut or kept whole by `map_along`'s rule).
    A quantized layout with no slicing rule counts as its own storage scaled by the share (planning refuses it)."""
    data = _data(tensor)
    full = data.shape[dim]
    if type(data) is torch.Tensor or type(data).__name__ not in LAYOUTS or not hasattr(data, "__tensor_flatten__"):
        return storage_bytes(data) * size // full if full else 0
    layout = LAYOUTS[type(data).__name__]
    names, attrs = data.__tensor_flatten__()
    block = attrs.get("block_size") if isinstance(attrs, dict) else None
    total = 0
    for inner_name in names:
        t = getattr(data, inner_name)
        whole = t.numel() * t.element_size()
        cut = t.dim() == data.dim() and _cut_with_weight(layout, inner_name, t, dim, full, block)
        total += whole * size // full if cut and full else whole
    return total


def meta_placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A plain meta tensor of `tensor`'s shape and dtype (torchao subclasses implement no `empty_like`)."""
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def loader_quantization(model) -> str | None:
    """The quantization method a model was loaded with by diffusers / transformers (`from_pretrained(...,
    quantization_config=...)`: "torchao", "bitsandbytes", "gguf", "quanto", ...), None if it was not. A torchao one
    leaves its weights as torchao tensor subclasses, which `refusal` judges one by one."""
    if not getattr(model, "is_quantized", False):
        return None
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    method = getattr(config, "quant_method", None)
    method = getattr(method, "value", method)  # an enum in diffusers and transformers
    return str(method) if method is not None else "unknown"
