"""How adapters plug in.

Two kinds of adapter, each a small file per family:
- a *context-parallel plan* for a denoiser (transformer / ControlNet): data, in diffusers' `_cp_plan` format,
  registered with `register_cp_plan(class_name)`; diffusers' own `_cp_plan` is used where the class has one.
- an *extra-module adapter* (text encoder, VAE, ControlNet): an `ExtraModuleAdapter` registered with
  `register_extra_adapter`, that says whether it handles a module, checks it locally, and applies itself,
  recording undo steps on the handle.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import UnsupportedError

# class name -> function returning the plan (built lazily: plan classes come from the installed diffusers).
_CP_PLANS: dict[str, Callable[[torch.nn.Module], dict]] = {}
# class name -> fn(model, config, handle, name): the forward change a plan of ours needs, recorded on the handle.
_CP_PREPARERS: dict[str, Callable] = {}
_EXTRA_ADAPTERS: list["ExtraModuleAdapter"] = []


def register_cp_plan(*class_names: str, prepare: Callable | None = None):
    """Register a plan builder; `prepare(model, config, handle, name)`, if given, makes the smallest forward change
    the plan needs (e.g. attention processors that take a parallel config). It runs during the local checks, before
    `check_context_parallel`, issues no collective, may raise a DiffparError, and records every change on the
    handle."""

    def deco(fn):
        for name in class_names:
            _CP_PLANS[name] = fn
            if prepare is not None:
                _CP_PREPARERS[name] = prepare
        return fn

    return deco


def prepare_cp_plan(model: torch.nn.Module, config, handle, name: str) -> None:
    """Run the preparer registered with our plan for `model` (none when diffusers ships the plan)."""
    _load_builtin_adapters()
    if getattr(type(model), "_cp_plan", None):
        return
    for cls in type(model).__mro__:
        if cls.__name__ in _CP_PLANS:
            prepare = _CP_PREPARERS.get(cls.__name__)
            if prepare is not None:
                prepare(model, config, handle, name)
            return


def cp_plan_for(model: torch.nn.Module) -> tuple[dict, str]:
    """The plan for `model` and where it came from ("diffusers" or "diffpar")."""
    _load_builtin_adapters()
    plan = getattr(type(model), "_cp_plan", None)
    if plan:
        return plan, "diffusers"
    for cls in type(model).__mro__:
        fn = _CP_PLANS.get(cls.__name__)
        if fn is not None:
            return fn(model), "diffpar"
    raise UnsupportedError(
        f"{type(model).__name__} has no context-parallel plan: diffusers ships none for it and diffpar has none yet. "
        f"Models with a plan here: {sorted(supported_cp_models())}. Use one of them, or pass parallelism only for "
        "the extra modules."
    )


# Classes that ship a `_cp_plan` in some diffusers release (0.36-0.42); each is checked on the installed one.
DIFFUSERS_CP_MODELS = (
    "FluxTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel", "WanTransformer3DModel",
    "LTXVideoTransformer3DModel", "ChronoEditTransformer3DModel", "HeliosTransformer3DModel",
    "LTX2VideoTransformer3DModel", "MiniMaxH3Transformer3DModel",
)


def supported_cp_models() -> set[str]:
    """Denoisers with a plan here: ours, and diffusers' own where the installed release has the class and plan."""
    _load_builtin_adapters()
    names = set(_CP_PLANS)
    import diffusers

    for name in DIFFUSERS_CP_MODELS:
        try:
            cls = getattr(diffusers, name)
        except (AttributeError, ImportError):
            continue
        if getattr(cls, "_cp_plan", None):
            names.add(name)
    return names


class ExtraModuleAdapter:
    """Parallelizes one kind of non-denoiser module over the whole world."""

    kind: str = "module"

    def matches(self, module: torch.nn.Module) -> bool:
        raise NotImplementedError

    def check(self, module: torch.nn.Module, world_size: int, config) -> None:
        """Local validation; raise DiffparError with what to do. No collectives here."""

    def describe(self, module: torch.nn.Module) -> dict:
        """Rank-comparable facts about the module (class, shapes) for the agreement check."""
        return {"class": type(module).__name__}

    def apply(self, module: torch.nn.Module, group, handle, config, *, pipeline=None, name: str = "") -> None:
        raise NotImplementedError


def register_extra_adapter(adapter: ExtraModuleAdapter) -> ExtraModuleAdapter:
    _EXTRA_ADAPTERS.append(adapter)
    return adapter


def extra_adapter_for(module: torch.nn.Module) -> ExtraModuleAdapter:
    _load_builtin_adapters()
    for adapter in _EXTRA_ADAPTERS:
        if adapter.matches(module):
            return adapter
    kinds = sorted({a.kind for a in _EXTRA_ADAPTERS})
    raise UnsupportedError(
        f"extra_parallel_modules: diffpar cannot parallelize a {type(module).__name__}. Supported kinds: {kinds}. "
        "Remove it from extra_parallel_modules (it then runs replicated on every rank)."
    )


_LOADED = False


def _load_builtin_adapters() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil

    from .. import adapters as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
