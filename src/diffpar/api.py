"""`enable_cache` / `disable_cache`: the one call a diffusers user adds."""
from __future__ import annotations

import logging
import warnings

import torch
import torch.distributed as dist

from . import mesh as mesh_lib
from .adapters.base import cp_plan_for, extra_adapter_for, prepare_cp_plan
from .compat import versions
from .config import ParallelismConfig
from .errors import DiffparError
from .hooks.context_parallel import apply_context_parallel, check_context_parallel
from .hooks.handle import ParallelHandle
from .hooks.patch import Patch

logger = logging.getLogger("diffpar")

# Pipeline attributes that hold the model that denoises, in the order pipelines use them.
DENOISER_ATTRS = ("transformer", "transformer_2", "unet", "prior", "decoder")


def _is_pipeline(obj) -> bool:
    return hasattr(obj, "components") and isinstance(getattr(obj, "components", None), dict)


def find_denoisers(target) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(target, torch.nn.Module):
        return [(type(target).__name__, target)]
    if not _is_pipeline(target):
        raise DiffparError(
            f"enable_cache expects a diffusers pipeline or a torch.nn.Module, got {type(target).__name__}."
        )
    found = [(n, getattr(target, n)) for n in DENOISER_ATTRS if isinstance(getattr(target, n, None), torch.nn.Module)]
    if not found:
        raise DiffparError(
            f"{type(target).__name__} has none of {list(DENOISER_ATTRS)}: diffpar cannot find the model that "
            "denoises. Pass the model itself: enable_cache(pipe.<your model>, ...)."
        )
    return found


def resolve_extra_modules(target, entries) -> list[tuple[str, torch.nn.Module]]:
    """Map entries (modules or attribute names) to (attribute name, module) of the pipeline."""
    if not entries:
        return []
    if not _is_pipeline(target):
        raise DiffparError(
            "extra_parallel_modules needs the pipeline: call enable_cache(pipe, ...) rather than on a bare model, "
            "so diffpar can check each entry belongs to it."
        )
    components = {n: m for n, m in target.components.items() if isinstance(m, torch.nn.Module)}
    by_id = {id(m): n for n, m in components.items()}
    resolved, seen = [], set()
    for entry in entries:
        if isinstance(entry, str):
            if entry not in components:
                raise DiffparError(
                    f"extra_parallel_modules: {type(target).__name__} has no module named {entry!r}. Its modules: "
                    f"{sorted(components)}."
                )
            name, module = entry, components[entry]
        else:
            if entry is None or id(entry) not in by_id:
                raise DiffparError(
                    f"extra_parallel_modules: a {type(entry).__name__} that is not a module of this "
                    f"{type(target).__name__} (modules: {sorted(components)}). Pass the pipeline's own attribute, "
                    "e.g. pipe.text_encoder, or its name 'text_encoder'."
                )
            name, module = by_id[id(entry)], entry
        if name in DENOISER_ATTRS:
            raise DiffparError(
                f"extra_parallel_modules: {name!r} is the denoiser, which ulysses_size/ring_size/tp_size already "
                "parallelize. Remove it from extra_parallel_modules."
            )
        if name in seen:
            raise DiffparError(f"extra_parallel_modules: {name!r} is listed twice.")
        seen.add(name)
        resolved.append((name, module))
    return resolved


def _model_summary(module: torch.nn.Module) -> dict:
    params = list(module.parameters())
    return {
        "class": type(module).__name__,
        "n_params": sum(p.numel() for p in params),
        "dtype": str(params[0].dtype) if params else None,
    }


def enable_cache(target, cache_config=None, parallelism_config: ParallelismConfig | None = None) -> ParallelHandle:
    """Parallelize (and, with `cache_config`, cache) a diffusers pipeline or model in place.

    Every rank launched by torchrun must make the same call. Returns a handle; `handle.detach()` or
    `disable_cache(target)` undoes everything.
    """
    existing = getattr(target, "_diffpar_handle", None)
    if existing is not None and not existing.detached:
        raise DiffparError(
            f"diffpar is already enabled on this {type(target).__name__}. Call diffpar.disable_cache(...) first; "
            "applying twice would stack hooks."
        )
    if parallelism_config is not None and not isinstance(parallelism_config, ParallelismConfig):
        raise DiffparError(
            f"parallelism_config must be a diffpar.ParallelismConfig, got {type(parallelism_config).__name__}."
        )
    handle = ParallelHandle(target=target, config=parallelism_config)
    try:
        if parallelism_config is not None:
            _enable_parallelism(target, parallelism_config, handle, cache_config)  # attaches the cache too
        elif cache_config is not None:
            from .cache import enable_cache_hooks

            enable_cache_hooks(target, cache_config, handle)
    except BaseException:
        handle.detach(strict=False)
        raise
    target._diffpar_handle = handle
    return handle


def disable_cache(target) -> list[str]:
    handle = getattr(target, "_diffpar_handle", None)
    if handle is None:
        raise DiffparError(f"diffpar is not enabled on this {type(target).__name__}; nothing to disable.")
    return handle.detach()


def _enable_parallelism(target, config: ParallelismConfig, handle: ParallelHandle, cache_config=None) -> None:
    if not mesh_lib.ensure_process_group() or dist.get_world_size() == 1:
        warnings.warn(
            "diffpar: one process only (no torchrun environment, or a world of 1): parallelism is a no-op. "
            "Launch with `torchrun --nproc_per_node=N script.py` to use N processes.",
            stacklevel=3,
        )
        handle.info["world_size"] = 1
        if cache_config is not None:
            from .cache import enable_cache_hooks

            enable_cache_hooks(target, cache_config, handle)
        return
    world = dist.get_world_size()

    # Local checks first, on every rank; their outcome travels in the one agreement collective below.
    local_error = None
    description = {"config": config.describe(), "versions": versions.describe(), "world_size": world}
    plans, extras = {}, []
    try:
        dims = mesh_lib.ParallelDims(world, config.ulysses_degree, config.ring_degree, config.tp_degree)
        denoisers = find_denoisers(target)
        for name, model in denoisers:
            description[f"denoiser:{name}"] = _model_summary(model)
            if config.cp_degree > 1:
                plans[name] = cp_plan_for(model)
                prepare_cp_plan(model, config, handle, name)  # our plans' forward changes, undone by the handle
                check_context_parallel(model, config)
            if config.tp_degree > 1:
                from .hooks.tensor_parallel import check_tensor_parallel

                check_tensor_parallel(model, config.tp_degree, config)
        for name, module in resolve_extra_modules(target, config.extra_parallel_modules):
            adapter = extra_adapter_for(module)
            adapter.check(module, world, config)
            description[f"extra:{name}"] = adapter.describe(module)
            extras.append((name, module, adapter))
        if _is_pipeline(target):
            from .adapters.controlnet import check_controlnet_listed

            check_controlnet_listed(target, config, {name for name, _, _ in extras})
        if cache_config is not None:
            # Ranks given different cache settings would decide differently and hang: agree on them too.
            from .cache import check_cache, describe_cache

            check_cache(target, cache_config)
            description["cache"] = describe_cache(cache_config)
    except Exception as exc:  # whatever failed here, every rank must still reach the agreement below
        local_error = exc
    mesh_lib.agree("diffpar.enable_cache", description, local_error)

    world_mesh = dims.build()
    handle.info.update(world_size=world, dims=dims, mesh=world_mesh)
    if dims.dp > 1:
        logger.warning(
            "diffpar: model degrees use %d of %d ranks; each of the %d groups computes the transformer redundantly.",
            world // dims.dp, world, dims.dp,
        )
    if cache_config is not None:
        # Before the context-parallel hooks: diffusers nests the hook registered last outermost, and a plan that
        # splits the sequence in a hook on a block (QwenImage, Z-Image: block 0) must run before a cache hook on
        # that block, so the cache measures the shard the block computes on (and a skipped block still gathers).
        from .cache import enable_cache_hooks

        enable_cache_hooks(target, cache_config, handle)
    for name, model in denoisers:
        if config.cp_degree > 1:
            plan, _source = plans[name]
            apply_context_parallel(model, plan, config, world_mesh["ring", "ulysses"], handle, name)
        if config.tp_degree > 1:
            from .hooks.tensor_parallel import apply_tensor_parallel

            apply_tensor_parallel(model, config, world_mesh["tp"], handle, name)
    for name, module, adapter in extras:
        adapter.apply(module, dist.group.WORLD, handle, config, pipeline=target if _is_pipeline(target) else None, name=name)
    if config.broadcast_latents and _is_pipeline(target) and hasattr(target, "prepare_latents"):
        _broadcast_latents(target, handle)


def _broadcast_latents(pipe, handle: ParallelHandle) -> None:
    """Every rank must start from rank 0's noise: without a generator, each rank would draw its own."""

    def wrapper(wrapped, instance, args, kwargs):
        result = wrapped(*args, **kwargs)
        items = result if isinstance(result, tuple) else (result,)
        for item in items:
            if isinstance(item, torch.Tensor):
                buf = item if item.is_contiguous() else item.contiguous()
                dist.broadcast(buf, src=0)
                if buf is not item:
                    item.copy_(buf)
        return result

    patch = Patch(pipe, "prepare_latents", wrapper, label=f"{type(pipe).__name__}.prepare_latents")
    handle.add("pipeline: broadcast initial latents from rank 0", patch.undo)
