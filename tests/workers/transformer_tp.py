"""Rank-side checks for transformer tensor parallelism and the CP x TP hybrid."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.compat import diffusers_tp
from diffpar.testing import tiny_transformers


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def _max_diff(a, b) -> float:
    """Max abs difference of two outputs; Z-Image returns a list of per-sample tensors."""
    if isinstance(a, (list, tuple)):
        return max(_max_diff(x, y) for x, y in zip(a, b))
    return (a - b).abs().max().item()


def _build(model_name: str, model_kwargs: dict | None):
    return tiny_transformers.build(model_name, **(model_kwargs or {}))


def local_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights this rank holds (shards are plain tensors of this rank's slice)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@contextlib.contextmanager
def our_plans(force: bool):
    """With `force`, plan with diffpar's TP plans even where the installed diffusers ships a `_tp_plan` (what
    releases before 0.40 get): the plan lookup is made to find no diffusers plan, and restored afterwards."""
    if not force:
        yield
        return
    original = diffusers_tp.native_tp_plan
    diffusers_tp.native_tp_plan = lambda model: None
    try:
        yield
    finally:
        diffusers_tp.native_tp_plan = original


def tp_equivalence(model_name: str, config: dict, seq: int = 16, text: int = 8, batch: int = 1,
                   model_kwargs: dict | None = None, input_kwargs: dict | None = None, force_diffpar: bool = False):
    """One process vs tensor (or hybrid) parallel on this world, then detach; per rank."""
    with our_plans(force_diffpar):
        model, make_inputs = _build(model_name, model_kwargs)
        inputs = make_inputs(seq=seq, text=text, batch=batch, **(input_kwargs or {}))
        reference_model = copy.deepcopy(model)
        full_bytes = local_weight_bytes(model)
        with torch.no_grad():
            reference = _first(reference_model(**copy.deepcopy(inputs)))
        handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
        sharded_bytes = local_weight_bytes(model)
        try:
            with torch.no_grad():
                parallel = _first(model(**copy.deepcopy(inputs)))
        except BaseException:  # a refused call must not leave the model parallel (nor compat shims installed)
            handle.detach()
            raise
        result = {
            "diff": _max_diff(parallel, reference),
            "engine": handle.plan.component(type(model).__name__).payload.tp_engine,
            "bytes_ratio": sharded_bytes / full_bytes,
            # Accounting from the plan alone (what diffpar.plan reports) matches what this rank holds.
            "plan_bytes_match": handle.plan.component(type(model).__name__).weight_bytes_per_rank == sharded_bytes,
            # (the plan reports the largest rank's bytes: with uneven heads the other ranks hold less)
            "plan_bytes": handle.plan.component(type(model).__name__).weight_bytes_per_rank,
            "sharded_bytes": sharded_bytes,
            "steps": handle.step_names,
            "rank": dist.get_rank(),
            # What this rank holds of every split layer, and the head counts its attentions read.
            "local_shapes": {s.path: tuple(model.get_submodule(s.path).weight.shape)
                             for s in getattr(handle.plan.component(type(model).__name__).payload.tp_plan, "layers",
                                              ())},
            "local_parameter_shapes": {
                f"{spec.path}.{name}": tuple(getattr(model.get_submodule(spec.path).inner, name).shape)
                for spec in getattr(handle.plan.component(type(model).__name__).payload.tp_plan, "parameters", ())
                for name, _, _ in spec.params},
            "local_heads": {name: m.heads for name, m in model.named_modules()
                            if isinstance(getattr(m, "heads", None), int) and not isinstance(m.heads, bool)},
        }
        handle.detach()
        with torch.no_grad():
            after = _first(model(**copy.deepcopy(inputs)))
        result["detach_diff"] = _max_diff(after, reference)
        ref_state = reference_model.state_dict()
        state = model.state_dict()
        result["detach_weights_equal"] = set(state) == set(ref_state) and all(
            type(state[k]) is torch.Tensor and torch.equal(state[k], ref_state[k]) for k in ref_state
        )
        return result


def expect_error(model_name: str, config: dict, model_kwargs: dict | None = None, force_diffpar: bool = False):
    """The error message enable_cache raises on this rank (or None)."""
    with our_plans(force_diffpar):
        model, _ = _build(model_name, model_kwargs)
        try:
            diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
        except diffpar.DiffparError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None


def rollback_before_commit(model_name: str, model_kwargs: dict | None = None, force_diffpar: bool = False):
    """Apply the tensor-parallel step alone, then undo it before commit (what a failure in a later step does):
    the undo must be local (no collective) and restore the very same layers. Also reports the sharded-weight
    convention: the module classes planned layers become and what `.weight.shape` shows on this rank."""
    from diffpar.engines import tensor_parallel
    from diffpar.handle import ParallelHandle
    from diffpar.mesh import ParallelDims

    world = dist.get_world_size()
    with our_plans(force_diffpar):
        model, _ = _build(model_name, model_kwargs)
        the_plan = diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(tp_size=world))
    shard_plan = the_plan.component(type(model).__name__).payload.tp_plan
    mesh = ParallelDims(world, 1, 1, world).build()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    before = {s.path: model.get_submodule(s.path) for s in shard_plan.layers}
    handle = ParallelHandle(target=model)
    tensor_parallel.apply_tensor_parallel(model, shard_plan, mesh["tp"], handle, "transformer")
    first = shard_plan.layers[0]
    layer = model.get_submodule(first.path)
    full = before[first.path].weight.shape
    convention = {
        "classes": sorted({type(model.get_submodule(s.path)).__name__ for s in shard_plan.layers}),
        "plain_tensors": all(type(p.data) is torch.Tensor for p in model.parameters()),
        "weight_shape": tuple(layer.weight.shape), "full_shape": tuple(full),
        "expected_rows": sum(b - a for a, b in first.ranges[dist.get_rank()]),
    }
    collectives = []
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce", "broadcast", "barrier")}

    def refuse(name):
        def call(*args, **kwargs):
            collectives.append(name)
            raise RuntimeError(f"collective {name} during a rollback before commit")
        return call

    for name in originals:
        setattr(dist, name, refuse(name))
    try:
        handle.detach()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    state = model.state_dict()
    return {
        **convention,
        "collectives": collectives,
        "same_layers": all(model.get_submodule(p) is m for p, m in before.items()),
        "restored": set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference),
    }
