"""Context parallelism on a denoiser through diffusers' own hooks.

We do what `ModelMixin.enable_parallelism` does, by hand, because it cannot run on CPU in 0.42 (it divides by
`torch.accelerator.device_count()`, which is 0 there) and it builds its own mesh: set the ParallelConfig on
every attention processor, then `apply_context_parallel` with the model's plan. Every change is recorded on
the handle and undone in reverse.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..compat import diffusers_cp
from ..errors import UnsupportedError
from ..translator import build_context_parallel_config

def attention_processors(model: torch.nn.Module):
    """(module, processor) pairs whose processor takes a parallel config."""
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            yield module, processor


def effective_backend(model: torch.nn.Module, requested: str | None) -> str:
    if requested is not None:
        return requested
    for _, processor in attention_processors(model):
        backend = getattr(processor, "_attention_backend", None)
        if backend is not None:
            return getattr(backend, "value", str(backend))
        break
    return diffusers_cp.active_backend_name()


def check_context_parallel(model: torch.nn.Module, config) -> None:
    """Local checks, no collectives."""
    if not any(True for _ in attention_processors(model)):
        raise UnsupportedError(
            f"{type(model).__name__} has no attention processor that takes a parallel config, so diffusers' context "
            "parallel attention cannot run inside it."
        )
    backend = effective_backend(model, config.attention_backend)
    from diffusers.models.attention_dispatch import AttentionBackendName

    try:
        AttentionBackendName(backend)
    except ValueError:
        raise UnsupportedError(
            f"attention_backend={backend!r} is not a diffusers attention backend. Context-parallel capable ones: "
            f"{diffusers_cp.cp_capable_backends()}."
        ) from None
    if not diffusers_cp.backend_supports_cp(backend):
        raise UnsupportedError(
            f"attention backend {backend!r} does not support context parallelism (diffusers would ignore the "
            f"parallel config and compute attention over a shard only: a wrong image). Use one of "
            f"{diffusers_cp.cp_capable_backends()} (on CPU: 'native')."
        )
    build_context_parallel_config(config)  # raises for what the installed release cannot do
    if config.ulysses_degree > 1 and not config.ulysses_anything:
        heads = attention_head_count(model)
        if heads is not None and heads % config.ulysses_degree != 0:
            works = max(d for d in range(1, heads + 1) if heads % d == 0 and d <= config.ulysses_degree)
            raise UnsupportedError(
                f"ulysses_size={config.ulysses_degree} does not divide the {heads} attention heads of "
                f"{type(model).__name__}: Ulysses gives each rank whole heads. Use ulysses_size={works} (the largest "
                f"that divides {heads}), add ring_size for the rest, or set ulysses_anything=True."
            )
    if config.ulysses_anything:
        heads = attention_head_count(model)
        p = config.ulysses_degree
        if heads is not None and heads % p and (p - heads % p) >= -(-heads // p):
            ok = [d for d in range(2, p + 1) if heads % d == 0 or (d - heads % d) < -(-heads // d)]
            raise UnsupportedError(
                f"ulysses_anything with ulysses_size={p} and {heads} attention heads: diffusers pads the heads on the "
                f"last rank only, which needs fewer padding heads ({p - heads % p}) than heads per rank "
                f"({-(-heads // p)}). Ulysses degrees that work for {heads} heads: {ok}; or use ring_size."
            )


def attention_head_count(model: torch.nn.Module) -> int | None:
    for module, _ in attention_processors(model):
        heads = getattr(module, "heads", None)
        if isinstance(heads, int):
            return heads
    return None


def apply_context_parallel(model: torch.nn.Module, plan: dict, config, cp_mesh, handle, name: str) -> None:
    from diffusers.hooks.context_parallel import apply_context_parallel as diffusers_apply
    from diffusers.models._modeling_parallel import ParallelConfig

    from ..mesh import current_device

    cp_config = build_context_parallel_config(config)
    parallel_config = ParallelConfig(context_parallel_config=cp_config)
    parallel_config.setup(dist.get_rank(), dist.get_world_size(), current_device(), mesh=cp_mesh)
    attach_parallel_config(model, parallel_config, config, handle, name)

    diffusers_apply(model, cp_config, plan)
    handle.add(f"{name}: context-parallel hooks", lambda: remove_context_parallel(model, plan))
    handle.info.setdefault("context_parallel", {})[name] = parallel_config


def attach_parallel_config(model: torch.nn.Module, parallel_config, config, handle, name: str) -> None:
    """Make a model's attention context-parallel with `parallel_config` (what diffusers' hooks then split for):
    the requested backend, the compat shims, every processor's and the model's `_parallel_config`. Undoable."""
    if config.attention_backend is not None:
        _set_backend(model, config.attention_backend, handle, name)

    diffusers_cp.SHARED_SHIMS.acquire()
    handle.add(f"{name}: diffusers compat shims", diffusers_cp.SHARED_SHIMS.release)

    previous = [(processor, processor._parallel_config) for _, processor in attention_processors(model)]
    for processor, _ in previous:
        processor._parallel_config = parallel_config

    def restore_processors():
        for processor, old in previous:
            processor._parallel_config = old

    handle.add(f"{name}: attention processors' _parallel_config", restore_processors)

    old_model_config = getattr(model, "_parallel_config", None)
    model._parallel_config = parallel_config
    handle.add(f"{name}: model._parallel_config", lambda: setattr(model, "_parallel_config", old_model_config))


def remove_context_parallel(model: torch.nn.Module, plan: dict) -> None:
    from diffusers.hooks.context_parallel import remove_context_parallel as diffusers_remove  # 0.36+

    diffusers_remove(model, plan)

def _set_backend(model, backend: str, handle, name: str) -> None:
    """Set the backend on this model's processors only; diffusers' setter also changes the process default."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active_before, _ = _AttentionBackendRegistry.get_active_backend()
    previous = [(p, getattr(p, "_attention_backend", None)) for _, p in attention_processors(model)]
    model.set_attention_backend(backend)
    diffusers_cp.set_active_backend(active_before)
    for p, _ in previous:
        p._attention_backend = AttentionBackendName(backend)

    def restore():
        for p, old in previous:
            p._attention_backend = old

    handle.add(f"{name}: attention backend", restore)
