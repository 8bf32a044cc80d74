"""Tensor parallelism: one engine that carries out a `ShardPlan` (engines/tp_shard.py) on plain tensors.

Used for transformers (`tp_size`: diffusers' `_tp_plan`, translated at planning time, or diffpar's plans) and for
text encoders in `extra_parallel_modules` (transformers' `base_model_tp_plan` or diffpar's T5/UMT5/CLIP plans).
Every planned layer is replaced by its shard: `ColumnParallelLinear` (this rank's output features; an all-gather
when the plan says `gather_output`), `RowParallelLinear` (this rank's input features, one all-reduce, the bias
added once), `HeadParallelEmbedding` (this rank's heads of a per-head table), `HeadShardedRMSNorm` (an RMSNorm over
all heads: the mean of squares is all-reduced), `HeadShardedLayerNorm` (a LayerNorm over all heads: [sum, sum of
squares] all-reduced at once) - both norms count a feature several ranks hold (a shared key/value head) once -,
`ReducedOutputModule` (packed experts: own parameters sliced along the hidden width, the output all-reduced);
per-head parameters (a gate) are sliced in place to this rank's heads; attributes a forward reads (head counts,
widths) get per-rank values. Weights are plain tensors: a shard's `.weight.shape` is this rank's slice.

Undo. Until `handle.commit()` the replaced layers stay referenced, so a rollback puts them back exactly and
locally. At commit they are released, and what detach does afterwards is the caller's choice (`detach=`):
- "gather" (transformers): the original modules are kept without their weights; detach all-gathers the shards
  back into them (a collective: every rank detaches together), bit for bit what was there when the weights were
  identical on every rank, which tensor parallelism needs anyway;
- "kept" (text encoders with keep_original_text_encoders): the originals are moved to the CPU and detach moves
  them back, exactly;
- "dropped" (text encoders by default): the originals are freed; detach cannot restore them and marks the shards
  so they refuse to run (the handle reports it as irreversible).

With ulysses_size / ring_size as well (hybrid), context-parallel hooks are applied first on the ("ring",
"ulysses") sub-mesh and the shards on the "tp" sub-mesh; Ulysses then spreads each rank's local heads, so
every rank's head count (heads / tp_size, or one more or less when tp_size does not divide them) must divide by
ulysses_size, unless ulysses_anything.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from diffpar.compat.quantized_tensors import (
    is_plain,
    layout_name,
    loader_quantization,
    map_along,
    meta_placeholder,
    refusal as quantized_refusal,
)
from diffpar.engines.sharded_loading import loaded_later
from diffpar.engines.tensor_parallel_linear import (
    ChannelParallelConv2d,
    ColumnParallelLinear,
    HeadParallelEmbedding,
    HeadShardedLayerNorm,
    HeadShardedRMSNorm,
    ReducedOutputModule,
    RowParallelLinear,
    gather_full,
    mark_detached,
)
from diffpar.engines.tp_shard import (
    CHANNELS,
    COLUMN,
    HEAD_TABLE,
    ROW,
    LAYER_NORM,
    HeadParameterShard,
    LayerShard,
    NormShard,
    OutputSlice,
    ParameterShard,
    ShardPlan,
)
from diffpar.errors import DiffparError, UnsupportedError

logger = logging.getLogger("diffpar")

DETACH_MODES = ("gather", "kept", "dropped")


# ------------------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------------------


def _make_shard(layer: nn.Module, shard: LayerShard, rank: int, group) -> nn.Module:
    ranges = shard.ranges[rank]
    if isinstance(layer, nn.Conv2d):
        mode = {COLUMN: "column", ROW: "row", CHANNELS: "depthwise"}[shard.kind]
        gathered = shard.sizes() if shard.kind == COLUMN and shard.gather_output else None
        return ChannelParallelConv2d(layer, mode, ranges, group, all_out_sizes=gathered)
    if shard.kind == COLUMN:
        return ColumnParallelLinear.from_linear(layer, ranges, group, gather_output=shard.gather_output,
                                                all_out_sizes=shard.sizes() if shard.gather_output else None)
    if shard.kind == ROW:
        return RowParallelLinear.from_linear(layer, ranges, group, input_is_parallel=shard.input_is_parallel)
    if shard.kind == HEAD_TABLE:
        if shard.gather_output:
            return HeadParallelEmbedding.from_embedding(layer, ranges, group=group, all_sizes=shard.sizes())
        return HeadParallelEmbedding.from_embedding(layer, ranges)
    raise DiffparError(f"tensor parallel: unknown shard kind {shard.kind!r} for {shard.path}")


def _narrow(tensor: torch.Tensor, dim: int, ranges) -> torch.Tensor:
    parts = [tensor.narrow(dim, a, b - a) for a, b in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _output_slicer(spec: OutputSlice, rank: int):
    """A forward hook narrowing every tensor output to this rank's columns (see `OutputSlice`)."""
    ranges = spec.ranges[rank]

    def hook(_module, _args, output):
        if isinstance(output, torch.Tensor):
            return _narrow(output, spec.dim, ranges)
        if isinstance(output, (tuple, list)):
            return type(output)(_narrow(t, spec.dim, ranges) if isinstance(t, torch.Tensor) else t for t in output)
        return output

    return hook


def _gather_full(local: torch.Tensor, dim: int, ranges, full_size: int, group) -> torch.Tensor:
    """`gather_full` of a plain or a known quantized weight (its data and per-row scales gathered, the rest taken
    whole from this rank): bit for bit the tensor the shards were cut from."""
    return map_along(local, dim, lambda t, d: gather_full(t, d, ranges, full_size, group), new_size=full_size)


def _as_parameter(full: torch.Tensor, placeholder: torch.Tensor) -> nn.Parameter:
    if full.dtype != placeholder.dtype:
        full = full.to(placeholder.dtype)
    return nn.Parameter(full, requires_grad=placeholder.requires_grad)


def _gather_back(original: nn.Module, new: nn.Module, spec, group) -> None:
    """Put the full parameters back into `original` (released at commit), gathered from every rank's shard."""
    with torch.no_grad():
        if isinstance(spec, ParameterShard):  # the sliced parameters live on the wrapper's inner copy
            for name, dim, ranges in spec.params:
                placeholder = getattr(original, name)
                full = _gather_full(getattr(new.inner, name).detach(), dim, ranges, placeholder.shape[dim], group)
                setattr(original, name, _as_parameter(full, placeholder))
            return
        for key, local in new.named_parameters(recurse=False):
            placeholder = getattr(original, key)
            if isinstance(spec, NormShard):
                full = _gather_full(local.detach(), 0, spec.ranges, spec.width, group)
            elif spec.kind == ROW and key == "bias":
                full = local.detach().clone()  # whole on every rank
            else:
                dim = 0 if spec.kind in (COLUMN, CHANNELS) else 1
                full = _gather_full(local.detach(), dim, spec.ranges, placeholder.shape[dim], group)
            setattr(original, key, _as_parameter(full, placeholder))


def _release_weights(original: nn.Module) -> None:
    """Drop `original`'s own parameters (meta placeholders keep shape, dtype and requires_grad for detach)."""
    for key, p in list(original.named_parameters(recurse=False)):
        setattr(original, key, nn.Parameter(meta_placeholder(p), requires_grad=p.requires_grad))


def shard_module(module: nn.Module, plan: ShardPlan, group, handle, label: str, *, detach: str,
                 irreversible_reason: str | None = None) -> None:
    """Replace every layer `plan` splits by this rank's shard and set the per-rank attributes.

    The undo is recorded on `handle` before the first change and tolerates a partial application; the release
    of the originals is registered with `handle.on_commit`. `detach` says what detach does after commit (see the
    module docstring); "dropped" needs `irreversible_reason`, the message detach reports.
    """
    if detach not in DETACH_MODES:
        raise ValueError(f"detach must be one of {DETACH_MODES}, got {detach!r}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world != plan.world:
        raise DiffparError(f"{label}: the plan is for {plan.world} ranks, the process group has {world}.")
    replaced = []  # [parent, child, original, shard, spec, device the original was on before it went to the CPU]
    old_attrs = []  # (module, attribute, value before)
    released = []
    hooks = []  # forward hooks of `plan.output_slices`
    # [holder, spec, full parameter until released (then None), its meta placeholder once released]
    head_params = []

    def restore_head_params():
        for holder, spec, full, placeholder in reversed(head_params):
            if full is None:  # released at commit: gathered from every rank's heads (same order on every rank)
                local = getattr(holder, spec.name).detach()
                full = _as_parameter(_gather_full(local, spec.dim, spec.ranges, placeholder.shape[spec.dim], group),
                                     placeholder)
            setattr(holder, spec.name, full)

    def undo():
        for hook in hooks:
            hook.remove()
        restore_head_params()
        if released and detach == "dropped":
            for _parent, child, _orig, new, _spec, _dev in replaced:
                mark_detached(new, f"{type(module).__name__} ({child})", world)
            return
        if released and detach == "gather":
            for _parent, _child, original, new, spec, _dev in replaced:  # same order on every rank
                _gather_back(original, new, spec, group)
        for parent, child, original, _new, _spec, device in reversed(replaced):
            if device is not None and device.type != "cpu":
                original.to(device)
            setattr(parent, child, original)
        for target, key, old in reversed(old_attrs):
            setattr(target, key, old)

    def release():
        released.append(True)
        for entry in replaced:
            if detach == "dropped":
                entry[2] = None  # referenced nowhere now: freed
            elif detach == "gather":
                _release_weights(entry[2])
        if detach == "gather":  # "kept" / "dropped": a per-head vector is small, kept whole for an exact detach
            for entry in head_params:
                entry[3] = nn.Parameter(meta_placeholder(entry[2]), requires_grad=entry[2].requires_grad)
                entry[2] = None

    handle.add(label, undo, irreversible_reason=irreversible_reason if detach == "dropped" else None,
               irreversible=lambda: bool(released) and detach == "dropped")
    handle.on_commit(release)
    specs = ([(s.path, s) for s in plan.layers] + [(n.path, n) for n in plan.norms]
             + [(p.path, p) for p in plan.parameters])
    for path, spec in specs:
        parent_path, _, child = path.rpartition(".")
        parent = module.get_submodule(parent_path) if parent_path else module
        original = getattr(parent, child)
        if isinstance(spec, NormShard) and spec.kind == LAYER_NORM:
            new = HeadShardedLayerNorm.from_norm(original, spec, rank, group)
        elif isinstance(spec, NormShard):
            new = HeadShardedRMSNorm.from_norm(original, spec, rank, group)
        elif isinstance(spec, ParameterShard):
            new = ReducedOutputModule.from_module(original, spec.params, rank,
                                                  spec.attributes[rank] if spec.attributes else {}, group)
        else:
            new = _make_shard(original, spec, rank, group)
        entry = [parent, child, original, new, spec, None]
        replaced.append(entry)
        setattr(parent, child, new)
        if detach == "kept":
            # Kept on the CPU so the accelerator memory is still saved; moved back (bit for bit) on detach.
            first = next(original.parameters(), None)
            entry[5] = first.device if first is not None else None
            if entry[5] is not None and entry[5].type != "cpu":
                original.to("cpu")
        del original
    for spec in plan.head_parameters:
        holder = module.get_submodule(spec.path)
        full = getattr(holder, spec.name)
        head_params.append([holder, spec, full, None])  # before the change: the undo puts `full` back
        setattr(holder, spec.name, nn.Parameter(_narrow(full.data, spec.dim, spec.ranges[rank]).clone(),
                                                requires_grad=full.requires_grad))
    for attr in plan.attributes:
        target = module.get_submodule(attr.path) if attr.path else module
        for key, value in attr.values[rank].items():
            old_attrs.append((target, key, getattr(target, key)))
            setattr(target, key, value)
    for spec in plan.output_slices:
        hooks.append(module.get_submodule(spec.path).register_forward_hook(_output_slicer(spec, rank)))


# ------------------------------------------------------------------------------------------------------------
# Transformers (tp_size): checks at planning time, apply over the "tp" sub-mesh
# ------------------------------------------------------------------------------------------------------------


def check_tensor_parallel(model: nn.Module, plan: ShardPlan, config=None) -> None:
    """Local checks, no collectives: the weights can be sliced, and (with `config`) the hybrid with Ulysses."""
    tp_degree = plan.world
    if not loaded_later(model) and any(p.device.type == "meta" for p in model.parameters()):
        raise UnsupportedError(
            f"tp_size={tp_degree} on {type(model).__name__}: some weights are on the meta device (offloaded or not "
            "loaded). Load the model fully onto this rank's device before enabling tensor parallelism."
        )
    if any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise UnsupportedError(
            f"tp_size={tp_degree} on {type(model).__name__}: the model is offloaded (accelerate hooks); its weights "
            "cannot be sliced per rank. Load it without offloading."
        )
    method = loader_quantization(model)
    if method is not None and method != "torchao":  # torchao: its weight layouts are checked layer by layer below
        raise UnsupportedError(
            f"tp_size={tp_degree} on {type(model).__name__}: the model was loaded quantized with {method!r}; its "
            "weights cannot be sliced per rank. Load it unquantized, or quantized with torchao int8 weight-only or "
            "float8 (TorchAoConfig), whose weights diffpar splits as they are."
        )
    for shard in plan.layers:
        layer = model.get_submodule(shard.path)
        if isinstance(layer, nn.Conv2d) and type(layer.weight.data) is torch.Tensor:
            _check_conv(model, shard, layer, tp_degree)
            continue
        if shard.kind == HEAD_TABLE and type(layer) is nn.Embedding and type(layer.weight.data) is torch.Tensor:
            if layer.max_norm is not None:  # renormalizes whole rows: a column shard would see only its part
                raise UnsupportedError(f"tp_size={tp_degree} on {type(model).__name__}: {shard.path} is an "
                                       "Embedding with max_norm; diffpar cannot split it by columns.")
            continue
        if not isinstance(layer, nn.Linear):
            weight = getattr(layer, "weight", None)
            quantized = (f" with a quantized weight ({layout_name(weight)}: diffpar splits quantized weights of "
                         "Linear layers only)" if isinstance(weight, torch.Tensor) and not is_plain(weight) else "")
            raise UnsupportedError(
                f"tp_size={tp_degree} on {type(model).__name__}: {shard.path} is a {type(layer).__name__}{quantized}, "
                "not a torch.nn.Linear (LoRA adapters?); diffpar can only split plain layers. Fuse or unload adapters."
            )
        # Plain weights, or quantized ones of a layout diffpar cuts exactly (torchao int8 / float8 per-row).
        reason = quantized_refusal(layer.weight, 0 if shard.kind == COLUMN else 1)
        if reason is None and layer.bias is not None and type(layer.bias.data) is not torch.Tensor:
            reason = f"its bias is a {type(layer.bias.data).__name__}, not a plain tensor"
        if reason is not None:
            raise UnsupportedError(
                f"tp_size={tp_degree} on {type(model).__name__}: {shard.path} cannot be split ({reason}). Load the "
                "model unquantized, or quantize it with torchao int8 weight-only (Int8WeightOnlyConfig) or float8."
            )
    for spec in plan.parameters:
        owner = model.get_submodule(spec.path)
        for name, dim, _ in spec.params:
            reason = quantized_refusal(getattr(owner, name), dim)
            if reason is not None:
                raise UnsupportedError(
                    f"tp_size={tp_degree} on {type(model).__name__}: the parameter {spec.path}.{name} cannot be "
                    f"sliced ({reason}). Load the model unquantized."
                )
    if config is not None:
        check_hybrid(model, plan, config)


def _check_conv(model: nn.Module, shard: LayerShard, conv: nn.Conv2d, tp_degree: int) -> None:
    """Convolutions diffpar splits by channels: 1x1 (column / row, like a Linear) and depthwise (channels)."""
    pointwise = conv.kernel_size == (1, 1) and conv.groups == 1 and conv.padding in ((0, 0), "valid")
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    ok = conv.padding_mode == "zeros" and (depthwise if shard.kind == CHANNELS else pointwise and not
                                          (shard.gather_output and shard.kind != COLUMN))
    if not ok:
        raise UnsupportedError(
            f"tp_size={tp_degree} on {type(model).__name__}: {shard.path} is a Conv2d (kernel {conv.kernel_size}, "
            f"groups {conv.groups}) that the plan splits as {shard.kind!r}; diffpar splits only 1x1 convolutions "
            "by output / input channels and depthwise convolutions by channel."
        )


def check_hybrid(model: nn.Module, plan: ShardPlan, config) -> None:
    if config.ulysses_degree <= 1:
        return
    tp_degree = plan.world
    if config.ulysses_anything:
        _check_hybrid_anything(model, plan, config.ulysses_degree)
        return
    for path, per_rank in plan.heads.items():
        h = sum(q for q, _ in per_rank)
        local = sorted({q for q, _ in per_rank})
        bad = [q for q in local if q % config.ulysses_degree]
        if bad:
            holds = (f"{h}/{tp_degree} = {local[0]} heads" if len(local) == 1 else
                     f"{' or '.join(map(str, local))} of the {h} heads (uneven: tp_size does not divide {h})")
            raise UnsupportedError(
                f"ulysses_size={config.ulysses_degree} x tp_size={tp_degree} on {type(model).__name__}: each tensor-"
                f"parallel rank holds {holds} of {path}, and Ulysses must spread those over "
                f"{config.ulysses_degree} ranks; {config.ulysses_degree} does not divide {bad[0]}. Use ulysses_size x "
                f"tp_size dividing {h} (e.g. a smaller ulysses_size and ring_size for the rest), or "
                "ulysses_anything=True."
            )


def _check_hybrid_anything(model: nn.Module, plan: ShardPlan, ulysses: int) -> None:
    """ulysses_anything pads each rank's local heads up to a multiple of `ulysses`, the padding on the last Ulysses
    rank only: it needs fewer padding heads than heads per rank (the same rule the context-parallel check applies
    to the whole model's heads, here to each tensor-parallel rank's share)."""
    for path, per_rank in plan.heads.items():
        for local in sorted({q for q, _ in per_rank}):
            if local % ulysses and (ulysses - local % ulysses) >= -(-local // ulysses):
                raise UnsupportedError(
                    f"ulysses_size={ulysses} x tp_size={plan.world} with ulysses_anything on {type(model).__name__}: a "
                    f"tensor-parallel rank holds {local} of the {sum(q for q, _ in per_rank)} heads of {path}, too "
                    f"few to pad over {ulysses} Ulysses ranks. Use a smaller ulysses_size or tp_size."
                )


def apply_tensor_parallel(model: nn.Module, plan: ShardPlan, tp_mesh, handle, name: str) -> None:
    """Shard `model` over `tp_mesh` as `plan` (built at planning time) says; detach gathers the weights back."""
    shard_module(model, plan, tp_mesh.get_group(), handle,
                 f"{name}: tensor-parallel weights, head counts and norms ({plan.source})", detach="gather")
    logger.info("diffpar: %s tensor parallel over %d ranks (%s)", name, plan.world, plan.source)
