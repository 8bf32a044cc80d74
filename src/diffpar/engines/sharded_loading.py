"""Sharded loading: build a module on the meta device and read only this rank's part of its weights from
safetensors files (`ParallelismConfig.weights_from`).

Tensor parallelism normally needs the whole model on every rank before it shards it, so a model larger than one
device cannot be loaded in order to be split. With `weights_from={"transformer": "/dir/or/file.safetensors"}`
the module is built without weights (`with torch.device("meta"): Model.from_config(...)`, or accelerate's
`init_empty_weights()`), the tensor-parallel engine replaces its layers by meta shards, and this engine then reads
each shard straight from the memory-mapped file as a slice (`safe_open(...).get_slice(name)[a:b]`), on the rank's
device: no rank ever holds a sharded weight whole, on the host or on the device. Everything the plan does not
shard (norms, embeddings, the output projection, and every weight of a context-parallel-only module) is read whole.

Planning (no collective, no change): the files exist, every parameter and persistent buffer has a tensor of the
same name and shape in them (the first mismatch is named), every parameter is on the meta device, and no
non-persistent buffer is (those are not in any file: build with `init_empty_weights()`, which leaves buffers real).
The plan records, for every tensor, the file, and per rank the ranges it reads along one dimension.

Undo. Before `handle.commit()` the meta parameters are put back exactly (a rollback leaves the module as the user
built it). After commit the loaded weights stay: a tensor-parallel transformer's detach then gathers the shards
back into its original layers (a collective), so detach returns the FULL model on every rank, which needs the
whole model's memory on each of them; a text encoder's detach says it must be reloaded (it never had its full
weights), and `keep_original_text_encoders=True` is refused with it.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from diffpar.compat.quantized_tensors import is_plain, layout_name
from diffpar.engines.tp_shard import CHANNELS, COLUMN, HEAD_TABLE, LAYER_NORM, ROW, ShardPlan
from diffpar.errors import DiffparError, UnsupportedError

try:  # safetensors comes with diffusers and transformers; imported here so tests can wrap it
    from safetensors import safe_open
except ImportError:  # pragma: no cover
    safe_open = None

DEVICE_KEY = "device"  # the one key of `weights_from` that is not a component name

# Modules the planner will load from files: their meta parameters are expected, not an error.
_LOADED_LATER: contextvars.ContextVar[frozenset] = contextvars.ContextVar("diffpar_loaded_later", default=frozenset())


def loaded_later(module: nn.Module) -> bool:
    """Whether `module` is being planned for sharded loading (its meta weights are then expected)."""
    return id(module) in _LOADED_LATER.get()


@contextlib.contextmanager
def planning_loads(modules):
    token = _LOADED_LATER.set(frozenset(id(m) for m in modules))
    try:
        yield
    finally:
        _LOADED_LATER.reset(token)


AUTO = "auto"  # weights_from="auto": every module diffpar.empty_pipeline built empty, from its own subfolder
# Set by diffpar.empty_pipeline on each module it built empty: the directory its weights are saved in.
SOURCE_ATTR = "_diffpar_weights_dir"


def resolve_auto(weights_from, named_modules: dict[str, nn.Module], required: bool = True):
    """`weights_from` with "auto" replaced by {name: the module's saved directory} for every module of
    `named_modules` that diffpar.empty_pipeline built empty and that is still on the meta device. `required`:
    finding none is an error (not in one process, where weights_from is not applied)."""
    if weights_from != AUTO:
        return weights_from
    found = {name: getattr(module, SOURCE_ATTR) for name, module in named_modules.items()
             if getattr(module, SOURCE_ATTR, None) is not None
             and any(p.is_meta for p in module.parameters())}
    if not found and required:
        raise DiffparError(
            'weights_from="auto": no module of this pipeline was built empty by diffpar.empty_pipeline (or each '
            "one is already loaded). Build the pipeline with diffpar.empty_pipeline(directory, ...), or name the "
            'files: weights_from={"transformer": "/dir/transformer", ...}.')
    return found


def split_request(weights_from: dict) -> tuple[dict[str, str], str | None]:
    """({component name: path}, device or None) from the user's `weights_from` (after `resolve_auto`)."""
    paths = {k: v for k, v in weights_from.items() if k != DEVICE_KEY}
    device = weights_from.get(DEVICE_KEY)
    return paths, (None if device is None else str(device))


# -- files -------------------------------------------------------------------------------------------------------
def safetensors_files(path: str, label: str) -> list[str]:
    """The safetensors files at `path`: the file itself, the files an `*.safetensors.index.json` in the directory
    names, or every `*.safetensors` file in it."""
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise DiffparError(f"weights_from[{label!r}]: {path} is not a .safetensors file.")
        return [path]
    if not os.path.isdir(path):
        raise DiffparError(f"weights_from[{label!r}]: {path} does not exist.")
    names = sorted(os.listdir(path))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        raise DiffparError(f"weights_from[{label!r}]: {path} holds several index files ({', '.join(indexes)}); "
                           "point to one of them's directory with only that model's files.")
    if indexes:
        with open(os.path.join(path, indexes[0])) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise DiffparError(f"weights_from[{label!r}]: {indexes[0]} names {missing[0]}, which does not exist.")
        return files
    files = [os.path.join(path, n) for n in names if n.endswith(".safetensors")]
    if not files:
        raise DiffparError(f"weights_from[{label!r}]: no .safetensors file in {path}.")
    return files


def tensor_index(files: list[str], label: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """tensor name -> (file, shape), from the files' headers only (nothing is read)."""
    index = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in index:
                    raise DiffparError(f"weights_from[{label!r}]: tensor {key!r} is in both {index[key][0]} and {path}.")
                index[key] = (path, tuple(f.get_slice(key).get_shape()))
    return index


# -- the plan ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorRead:
    """One tensor of the module: its alias paths in the module, the name and file it comes from, and what each rank
    reads of it: `ranges[rank]` along `dim`, or the whole tensor when `dim` is None."""

    paths: tuple[str, ...]
    key: str
    file: str
    shape: tuple[int, ...]
    is_buffer: bool = False
    dim: int | None = None
    ranges: tuple = ()  # rank -> ((start, stop), ...)


@dataclass(frozen=True)
class LoadPlan:
    """What sharded loading does to one module (planning's payload; `target_module` is not named `module` on
    purpose: the call agreement's weight check reads `payload.module` of whole modules only)."""

    name: str
    target_module: nn.Module
    reads: tuple[TensorRead, ...]
    rank_group: str  # "tp" (a transformer's tensor-parallel ranks), "world" (text encoders), "none" (read whole)
    device: str | None
    moved_buffers: tuple[str, ...] = ()  # real buffers that are not in the files: moved to the device
    bytes_per_rank: tuple[int, ...] = ()
    full_bytes: int = 0
    sharded_keys: frozenset = field(default_factory=frozenset)


def _sliced_dims(shard_plan: ShardPlan | None) -> dict[str, tuple[int, tuple]]:
    """Module path of a parameter -> (dimension, per-rank ranges) for every parameter the plan slices (the same
    convention as `ShardPlan.weight_bytes` and the parallel layers)."""
    out = {}
    if shard_plan is None:
        return out
    for shard in shard_plan.layers:
        ranges = tuple(tuple(r) for r in shard.ranges)
        if shard.kind in (COLUMN, CHANNELS):
            out[f"{shard.path}.weight"] = (0, ranges)
            out[f"{shard.path}.bias"] = (0, ranges)
        elif shard.kind == ROW:
            out[f"{shard.path}.weight"] = (1, ranges)  # the bias stays whole: added once after the sum
        elif shard.kind == HEAD_TABLE:
            out[f"{shard.path}.weight"] = (1, ranges)
    for norm in shard_plan.norms:
        ranges = tuple(tuple(r) for r in norm.ranges)
        out[f"{norm.path}.weight"] = (0, ranges)
        if norm.kind == LAYER_NORM:  # a LayerNorm shard keeps its slice of the bias too
            out[f"{norm.path}.bias"] = (0, ranges)
    for spec in shard_plan.parameters:  # packed expert weights, sliced along their hidden width
        for name, dim, ranges in spec.params:
            out[f"{spec.path}.{name}"] = (dim, tuple(tuple(r) for r in ranges))
    for spec in shard_plan.head_parameters:  # one entry per head (Lumina-Next's gate)
        key = f"{spec.path}.{spec.name}" if spec.path else spec.name  # a parameter of the model itself
        out[key] = (spec.dim, tuple(tuple(r) for r in spec.ranges))
    return out


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def plan_loading(name: str, module: nn.Module, path: str, shard_plan: ShardPlan | None, rank_group: str,
                 device: str | None) -> LoadPlan:
    """Every local check of loading `module` from `path`, and what each rank reads. No collective, no change."""
    if safe_open is None:
        raise UnsupportedError("weights_from needs the safetensors package (pip install safetensors).")
    on_device = [n for n, p in module.named_parameters() if p.device.type != "meta"]
    if on_device:
        raise DiffparError(
            f"weights_from[{name!r}]: {type(module).__name__}.{on_device[0]} is already loaded (on "
            f"{module.get_parameter(on_device[0]).device}); sharded loading fills a module built on the meta device "
            "(`with torch.device('meta'): Model.from_config(config)` or accelerate's init_empty_weights()). Build it "
            f"that way, or drop {name!r} from weights_from."
        )
    quantized = [n for n, p in module.named_parameters() if not is_plain(p)]
    if quantized:
        # The files hold plain weights read into plain shards: a quantized layout would be silently replaced by them.
        raise UnsupportedError(
            f"weights_from[{name!r}]: {type(module).__name__}.{quantized[0]} is a quantized weight "
            f"({layout_name(module.get_parameter(quantized[0]))}); sharded loading reads plain weights from "
            "safetensors files and does not quantize them. Load the quantized model whole on each rank and use "
            f"tp_size without weights_from (torchao int8 / float8 per-row weights are split as they are), or drop "
            f"{name!r} from weights_from."
        )
    files = safetensors_files(os.fspath(path), name)
    index = tensor_index(files, name)
    aliases: dict[int, list[str]] = {}
    params: dict[int, torch.Tensor] = {}
    for pname, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(pname)
        params[id(p)] = p
    # Weights the model ties (T5's shared and embed_tokens) are saved once; built on meta they may be two tensors
    # (accelerate's init_empty_weights): loaded as one, as from_pretrained would tie them.
    ties = getattr(module, "all_tied_weights_keys", None) or getattr(module, "_tied_weights_keys", None)
    if isinstance(ties, dict):
        by_path = {a: pid for pid, paths in aliases.items() for a in paths}
        for tied, source in ties.items():
            a, b = by_path.get(tied), by_path.get(source)
            if a is not None and b is not None and a != b and params[a].shape == params[b].shape:
                aliases[b].extend(aliases.pop(a))
                by_path.update({path: b for path in aliases[b]})
    persistent, moved = [], []
    for owner_path, owner in module.named_modules():
        for bname, buf in owner._buffers.items():
            if buf is None:
                continue
            full = f"{owner_path}.{bname}" if owner_path else bname
            if bname in owner._non_persistent_buffers_set:
                if buf.device.type == "meta":
                    raise DiffparError(
                        f"weights_from[{name!r}]: the buffer {full} of {type(module).__name__} is on the meta device "
                        "and is not saved in any file (a non-persistent buffer). Build the module with accelerate's "
                        "init_empty_weights() (parameters on meta, buffers real) instead of torch.device('meta')."
                    )
                moved.append(full)
            else:
                persistent.append((full, buf))
    sliced = _sliced_dims(shard_plan)
    world = shard_plan.world if shard_plan is not None else 1
    reads, used = [], set()
    per_rank = [0] * world
    full_bytes = 0

    def found(paths, shape, what):
        for candidate in paths:
            if candidate in index:
                file, file_shape = index[candidate]
                if tuple(file_shape) != tuple(shape):
                    raise DiffparError(
                        f"weights_from[{name!r}]: {what} {candidate} has shape {tuple(shape)} in "
                        f"{type(module).__name__} but {tuple(file_shape)} in {file}: the files are not this model's "
                        "(another config or release?)."
                    )
                return candidate, file
        raise DiffparError(
            f"weights_from[{name!r}]: {what} {paths[0]} of {type(module).__name__} is in none of the files under "
            f"{path} ({len(index)} tensors, e.g. {sorted(index)[:2]}): they are not this model's, or were saved "
            "with other names."
        )

    for pid, paths in aliases.items():
        p = params[pid]
        key, file = found(paths, p.shape, "the parameter")
        used.update(a for a in paths if a in index)  # a tied weight may be saved under each of its names
        split = next((sliced[a] for a in paths if a in sliced), None)
        size = _element_size(p.dtype)
        full_bytes += p.numel() * size
        if split is None:
            reads.append(TensorRead(tuple(paths), key, file, tuple(p.shape)))
            for r in range(world):
                per_rank[r] += p.numel() * size
        else:
            dim, ranges = split
            reads.append(TensorRead(tuple(paths), key, file, tuple(p.shape), dim=dim, ranges=ranges))
            other = p.numel() // p.shape[dim]
            for r in range(world):
                per_rank[r] += sum(b - a for a, b in ranges[r]) * other * size
    for full, buf in persistent:
        key, file = found([full], buf.shape, "the buffer")
        used.add(key)
        reads.append(TensorRead((full,), key, file, tuple(buf.shape), is_buffer=True))
        nbytes = buf.numel() * _element_size(buf.dtype)
        full_bytes += nbytes
        for r in range(world):
            per_rank[r] += nbytes
    unexpected = sorted(set(index) - used)
    if unexpected:
        raise DiffparError(
            f"weights_from[{name!r}]: the files under {path} hold {len(unexpected)} tensor(s) that "
            f"{type(module).__name__} does not have, first {unexpected[0]!r}: they are not this model's (another "
            "config?)."
        )
    return LoadPlan(name=name, target_module=module, reads=tuple(reads), rank_group=rank_group, device=device,
                    moved_buffers=tuple(moved), bytes_per_rank=tuple(per_rank), full_bytes=full_bytes,
                    sharded_keys=frozenset(r.key for r in reads if r.dim is not None))


def describe_plan(plan: LoadPlan) -> dict:
    """Rank-comparable facts (no device: each rank's is its own)."""
    files = sorted({os.path.basename(r.file) for r in plan.reads})
    return {"files": files, "tensors": len(plan.reads), "sliced": len(plan.sharded_keys),
            "bytes_per_rank": list(plan.bytes_per_rank), "full_bytes": plan.full_bytes}


# -- apply -------------------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    """The rank's current accelerator, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def read_parts(f, read: TensorRead, rank: int) -> list[torch.Tensor]:
    """This rank's part of one tensor, as views of the memory-mapped file (safetensors addresses the file's bytes
    through a zero-copy view of the whole tensor and slices it: nothing is copied or allocated here)."""
    if read.dim is None:
        return [f.get_tensor(read.key)]
    view = f.get_slice(read.key)
    parts = []
    for a, b in read.ranges[rank]:
        index = (slice(a, b),) if read.dim == 0 else (slice(None), slice(a, b))
        parts.append(view[index])
    return parts


def materialise(parts: list[torch.Tensor], dim: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One contiguous tensor of `dtype` on `device` holding `parts` side by side along `dim`: the only allocation
    is this rank's slice, and each part is copied straight into it (no intermediate on the host)."""
    shape = list(parts[0].shape)
    if dim is not None:
        shape[dim] = sum(p.shape[dim] for p in parts)
    out = torch.empty(shape, dtype=dtype, device=device)
    start = 0
    for part in parts:
        if dim is None:
            out.copy_(part)
        else:
            out.narrow(dim, start, part.shape[dim]).copy_(part)
            start += part.shape[dim]
    return out


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return (module.get_submodule(parent) if parent else module), leaf


def apply_loading(plan: LoadPlan, rank: int, handle) -> dict:
    """Materialise this rank's part of every tensor of `plan.target_module` on the device; return what was read.

    Run after the tensor-parallel engine replaced the sharded layers (their parameters are meta shards of this
    rank's shape, which is checked). The undo (recorded first) puts the meta tensors back until commit."""
    module = plan.target_module
    device = torch.device(plan.device) if plan.device is not None else default_device()
    changed = []  # (owner, attribute, previous tensor, is_buffer)
    committed = []

    def undo():
        if committed:
            return  # after commit the loaded weights are the module's (see the module docstring)
        for owner, attr, previous, is_buffer in reversed(changed):
            if is_buffer:
                owner._buffers[attr] = previous
            else:
                setattr(owner, attr, previous)

    handle.add(f"{plan.name}: weights loaded from safetensors ({plan.rank_group} rank {rank})", undo)
    handle.on_commit(lambda: committed.append(True))
    read_bytes = 0
    by_file: dict[str, list[TensorRead]] = {}
    for read in plan.reads:
        by_file.setdefault(read.file, []).append(read)
    for file, reads in by_file.items():
        # Opened on the CPU: the file stays memory-mapped (pages shared by every rank on the host) and only the
        # slices are copied to the device.
        with safe_open(file, framework="pt") as f:
            for read in reads:
                owner, attr = _owner(module, read.paths[0])
                current = owner._buffers[attr] if read.is_buffer else getattr(owner, attr)
                tensor = materialise(read_parts(f, read, rank), read.dim, current.dtype, device)
                if tuple(tensor.shape) != tuple(current.shape):
                    raise DiffparError(
                        f"weights_from[{plan.name!r}]: {read.key} read for rank {rank} has shape "
                        f"{tuple(tensor.shape)}, but the module holds {tuple(current.shape)} there."
                    )
                read_bytes += tensor.numel() * tensor.element_size()
                if read.is_buffer:
                    changed.append((owner, attr, current, True))
                    owner._buffers[attr] = tensor
                    continue
                loaded = nn.Parameter(tensor, requires_grad=current.requires_grad)
                for alias in read.paths:  # tied weights stay one tensor
                    alias_owner, alias_attr = _owner(module, alias)
                    changed.append((alias_owner, alias_attr, getattr(alias_owner, alias_attr), False))
                    setattr(alias_owner, alias_attr, loaded)
    for full in plan.moved_buffers:
        owner, attr = _owner(module, full)
        current = owner._buffers[attr]
        if current.device != device:
            changed.append((owner, attr, current, True))
            owner._buffers[attr] = current.to(device)
    left = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if left:
        raise DiffparError(f"weights_from[{plan.name!r}]: {left[0]} is still on the meta device after loading.")
    return {"rank": rank, "device": str(device), "read_bytes": read_bytes, "full_bytes": plan.full_bytes,
            "tensors": len(plan.reads), "sliced_tensors": len(plan.sharded_keys)}
