"""Context parallelism on a denoiser (or ControlNet) through diffusers' own hooks.

We do what `ModelMixin.enable_parallelism` does, by hand, because it cannot run on CPU in 0.42 (it divides by
`torch.accelerator.device_count()`, which is 0 there) and it builds its own mesh: set the ParallelConfig on
every attention processor, then diffusers' `apply_context_parallel` with the model's plan. The plan comes in as
data (a `_cp_plan` dict, from diffusers or from a family file); this engine never looks a model family up.
Every change records its undo on the handle before it is made.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from diffpar.compat import diffusers_cp
from diffpar.engines.context_parallel_config import context_parallel_kwargs
from diffpar.errors import UnsupportedError


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


def check_context_parallel(model: torch.nn.Module, config, *, processors_come_with_plan: bool = False) -> dict:
    """Local checks, no collectives, no change. Returns the keyword arguments of diffusers' ContextParallelConfig
    for the installed release (what `new_parallel_config` takes). `processors_come_with_plan`: the plan's own
    prepare step installs attention processors that take a parallel config (so their absence now is expected)."""
    if not processors_come_with_plan and not any(True for _ in attention_processors(model)):
        raise UnsupportedError(
            f"{type(model).__name__} has no attention processor that takes a parallel config, so diffusers' context "
            "parallel attention cannot run inside it."
        )
    backend = effective_backend(model, config.attention_backend)
    if not diffusers_cp.is_backend_name(backend):
        raise UnsupportedError(
            f"attention_backend={backend!r} is not a diffusers attention backend. Context-parallel capable ones: "
            f"{diffusers_cp.cp_capable_backends()}."
        )
    missing = diffusers_cp.backend_unavailable_reason(backend)
    if missing:
        raise UnsupportedError(
            f"attention backend {backend!r} cannot run in this process: {missing} Install it on every rank, or "
            f"use another of {diffusers_cp.cp_capable_backends()} (on CPU: 'native')."
        )
    if not diffusers_cp.backend_supports_cp(backend):
        raise UnsupportedError(
            f"attention backend {backend!r} does not support context parallelism (diffusers would ignore the "
            f"parallel config and compute attention over a shard only: a wrong image). Use one of "
            f"{diffusers_cp.cp_capable_backends()} (on CPU: 'native')."
        )
    cp_kwargs = context_parallel_kwargs(config)  # raises for what the installed release cannot do
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
    return cp_kwargs


def attention_head_count(model: torch.nn.Module) -> int | None:
    for module, _ in attention_processors(model):
        heads = getattr(module, "heads", None)
        if isinstance(heads, int):
            return heads
    return None


def new_parallel_config(cp_kwargs: dict, cp_mesh):
    """diffusers' ParallelConfig for the planned ContextParallelConfig arguments, on `cp_mesh`."""
    from diffpar.mesh import current_device

    return diffusers_cp.new_parallel_config(
        dist.get_rank(), dist.get_world_size(), current_device(), cp_mesh, **cp_kwargs
    )


def apply_context_parallel(model: torch.nn.Module, plan: dict, config, parallel_config, handle, name: str,
                           prepare=None, tokens: str | None = None) -> None:
    """Hooks for `plan` (diffusers' `_cp_plan` format) on `model`, attention on `parallel_config`.

    `prepare(model, config, handle, name)`, when the plan has one, makes the smallest forward change the plan
    needs (e.g. attention processors that take a parallel config) and records its own undo. `tokens`: what the
    split sequence counts ("video", "audio", "image"; None: guessed from the class), named by split refusals.
    """
    if prepare is not None:
        prepare(model, config, handle, name)
    attach_parallel_config(model, parallel_config, config, handle, name)
    diffusers_cp.guard_whole_text_mask(model, plan, handle, name)
    handle.add(f"{name}: context-parallel hooks", lambda: diffusers_cp.remove_cp_hooks(model, plan))
    diffusers_cp.apply_cp_hooks(model, parallel_config.context_parallel_config, plan, tokens=tokens)


def attach_parallel_config(model: torch.nn.Module, parallel_config, config, handle, name: str) -> None:
    """Make a model's attention context-parallel with `parallel_config` (what diffusers' hooks then split for):
    the requested backend, the compat shims, every processor's and the model's `_parallel_config`. Undoable."""
    if config.attention_backend is not None:
        restore = []
        handle.add(f"{name}: attention backend", lambda: [fn() for fn in restore])
        processors = [p for _, p in attention_processors(model)]
        restore.append(diffusers_cp.set_model_backend(model, config.attention_backend, processors))

    acquired = []
    handle.add(f"{name}: diffusers compat shims", lambda: [diffusers_cp.SHARED_SHIMS.release() for _ in acquired])
    diffusers_cp.SHARED_SHIMS.acquire()
    acquired.append(True)

    previous = [(processor, processor._parallel_config) for _, processor in attention_processors(model)]

    def restore_processors():
        for processor, old in previous:
            processor._parallel_config = old

    handle.add(f"{name}: attention processors' _parallel_config", restore_processors)
    for processor, _ in previous:
        processor._parallel_config = parallel_config

    # Each call starts on the configured split mode; a call whose lengths do not divide switches itself to the
    # uneven path (compat's split check), on this config only, until the next call.
    cp_config = parallel_config.context_parallel_config
    configured = {"ulysses_anything": config.ulysses_anything, "ring_anything": config.ring_anything}
    removers = []
    handle.add(f"{name}: per-call split mode reset", lambda: [r.remove() for r in removers])
    removers.append(model.register_forward_pre_hook(
        lambda module, args: diffusers_cp.reset_uneven_split(cp_config, configured)))

    old_model_config = getattr(model, "_parallel_config", None)
    handle.add(f"{name}: model._parallel_config", lambda: setattr(model, "_parallel_config", old_model_config))
    model._parallel_config = parallel_config


def remove_context_parallel(model: torch.nn.Module, plan: dict) -> None:
    diffusers_cp.remove_cp_hooks(model, plan)
