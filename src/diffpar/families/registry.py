"""How family files plug in: one registry helper, looked up by class along the MRO, filled by explicit imports.

A family file registers data and small functions:
- a *context-parallel plan* for a denoiser: `register_cp_plan(class_name, prepare=...)` on a function returning a
  plan in diffusers' `_cp_plan` format (diffusers' own `_cp_plan` is used where the class has one);
- an *extra-module adapter* (text encoder, VAE, ControlNet) with `register_extra_adapter`: it says whether it
  handles a module, plans it (every local check, no collective, no change) and applies its plan.

Registries are keyed by class *name* (a family may name classes the installed diffusers does not have) and looked
up along the module's MRO, so a subclass of a supported class finds its parent's entry. They are filled when
`diffpar.families.catalog` imports every family file, which the plan layer does (so `import diffpar` is enough).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterable, TypeVar

import torch

from diffpar.compat.diffusers_cp_hooks import native_cp_plan
from diffpar.errors import UnsupportedError

T = TypeVar("T")


class ClassRegistry(Generic[T]):
    """class name -> value, looked up along a class's MRO (the one lookup every registry here uses)."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, class_names: Iterable[str], value: T) -> T:
        for name in class_names:
            if name in self._entries and self._entries[name] is not value:
                raise ValueError(f"{self.what}: {name} is registered twice")
            self._entries[name] = value
        return value

    def lookup(self, obj) -> T | None:
        """The entry of `obj` (a module, or a class), searching its class's MRO; None when there is none."""
        cls = obj if isinstance(obj, type) else type(obj)
        for klass in cls.__mro__:
            if klass.__name__ in self._entries:
                return self._entries[klass.__name__]
        return None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self):
        return sorted(self._entries.items())


# ------------------------------------------------------------------------------------------------------------
# Denoiser context-parallel plans
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CPPlanEntry:
    """Our plan for a denoiser class: `build(model) -> _cp_plan dict`, and an optional `prepare(model, config,
    handle, name)`, the smallest removable forward change the plan needs (run at apply time, undo recorded first)."""

    build: Callable[[torch.nn.Module], dict]
    prepare: Callable | None = None
    # Whether the plan can run before `prepare` has swapped the attention processors (the local check then
    # trusts that `prepare` installs processors that take a parallel config).
    prepare_installs_processors: bool = False
    # Whether this plan replaces diffusers' own `_cp_plan` for the class (used where diffusers' plan is wrong,
    # e.g. LTX's splits the prompt and its mask, which breaks its attention under Ulysses). Default: diffusers'
    # plan wins wherever the installed release ships one.
    overrides_native: bool = False
    # Where `prepare`'s own hooks split and gather the sequence, one readable line per point ("module(inputs)"),
    # for the dry run: a plan whose split lives in those hooks has no `_cp_plan` entry to show for it.
    hook_splits: tuple[str, ...] = ()
    hook_gathers: tuple[str, ...] = ()
    # What the split sequence counts ("video", "audio" or "image"), for refusals that name it; "": guessed from the
    # class name (where the name misleads, e.g. JoyImage's "3D" image models, the family says).
    tokens: str = ""


CP_PLANS: ClassRegistry[CPPlanEntry] = ClassRegistry("context-parallel plan")


def register_cp_plan(*class_names: str, prepare: Callable | None = None, overrides_native: bool = False,
                     hook_splits: tuple[str, ...] = (), hook_gathers: tuple[str, ...] = (), tokens: str = ""):
    """Register a plan builder for `class_names`, with an optional `prepare` step (see CPPlanEntry).
    `overrides_native=True`: use it even where diffusers ships a `_cp_plan` for the class (say why in the family
    file). `hook_splits` / `hook_gathers`: where `prepare`'s hooks split / gather the sequence, for the dry run.
    `tokens`: what the sequence counts ("video", "audio", "image"), where the class name does not say it."""
    if tokens not in ("", "video", "audio", "image"):
        raise ValueError(f"register_cp_plan{class_names}: tokens must be 'video', 'audio' or 'image', got {tokens!r}")

    def deco(fn):
        CP_PLANS.register(class_names, CPPlanEntry(fn, prepare, prepare_installs_processors=prepare is not None,
                                                   overrides_native=overrides_native,
                                                   hook_splits=tuple(hook_splits), hook_gathers=tuple(hook_gathers),
                                                   tokens=tokens))
        return fn

    return deco


def cp_plan_for(model: torch.nn.Module) -> tuple[dict, str]:
    """The plan for `model` and where it came from ("diffusers" or "diffpar")."""
    entry = CP_PLANS.lookup(model)
    if entry is not None and entry.overrides_native:
        return entry.build(model), "diffpar"
    plan = native_cp_plan(type(model))
    if plan:
        return plan, "diffusers"
    entry = CP_PLANS.lookup(model)
    if entry is not None:
        return entry.build(model), "diffpar"
    raise UnsupportedError(
        f"{type(model).__name__} has no context-parallel plan: diffusers ships none for it and diffpar has none yet. "
        f"Models with a plan here: {sorted(supported_cp_models())}. Use one of them, or pass parallelism only for "
        "the extra modules."
    )


def cp_plan_entry(model: torch.nn.Module) -> CPPlanEntry | None:
    """Our entry for `model` (None when diffusers' plan is used, or nobody has one)."""
    entry = CP_PLANS.lookup(model)
    if entry is not None and entry.overrides_native:
        return entry
    if native_cp_plan(type(model)):
        return None
    return entry


def split_token_kind(model: torch.nn.Module) -> str | None:
    """What `model`'s split sequence counts, as its family says ("video", "audio", "image"), or None (the refusal
    then guesses from the class name). Read whether or not diffusers' own plan is the one used."""
    entry = CP_PLANS.lookup(model)
    return (entry.tokens or None) if entry is not None else None


# Classes that ship a `_cp_plan` in some diffusers release (0.36-0.42); each is checked on the installed one.
DIFFUSERS_CP_MODELS = (
    "FluxTransformer2DModel", "Flux2Transformer2DModel", "QwenImageTransformer2DModel", "WanTransformer3DModel",
    "LTXVideoTransformer3DModel", "ChronoEditTransformer3DModel", "HeliosTransformer3DModel",
    "LTX2VideoTransformer3DModel", "MiniMaxH3Transformer3DModel",
)


def supported_cp_models() -> set[str]:
    """Denoisers with a plan here: ours, and diffusers' own where the installed release has the class and plan."""
    names = set(CP_PLANS.names())
    import diffusers

    for name in DIFFUSERS_CP_MODELS:
        try:
            cls = getattr(diffusers, name)
        except (AttributeError, ImportError):
            continue
        if native_cp_plan(cls):
            names.add(name)
    return names


# ------------------------------------------------------------------------------------------------------------
# Extra modules (text encoders, VAEs, ControlNets)
# ------------------------------------------------------------------------------------------------------------


class ExtraModuleAdapter:
    """Parallelizes one kind of non-denoiser module over the whole world.

    `plan` does every local check and computes everything `apply` needs (no collective, no change to the module);
    `apply` carries out exactly that plan, recording each undo on the handle *before* the change it undoes, and
    returns the runtime state callers may inspect (`handle.state(name)`), or None.
    """

    kind: str = "module"

    def matches(self, module: torch.nn.Module) -> bool:
        raise NotImplementedError

    def plan(self, module: torch.nn.Module, name: str, world_size: int, config):
        """-> diffpar.plan_types.ComponentPlan. Raise DiffparError / UnsupportedError with what to do."""
        raise NotImplementedError

    def apply(self, module: torch.nn.Module, plan, group, handle, config, context):
        """Carry out `plan` (a ComponentPlan from `self.plan`); `context` is a plan_types.ApplyContext."""
        raise NotImplementedError


_EXTRA_ADAPTERS: list[ExtraModuleAdapter] = []


def register_extra_adapter(adapter: ExtraModuleAdapter) -> ExtraModuleAdapter:
    _EXTRA_ADAPTERS.append(adapter)
    return adapter


def extra_adapter_for(module: torch.nn.Module) -> ExtraModuleAdapter:
    for adapter in _EXTRA_ADAPTERS:
        if adapter.matches(module):
            return adapter
    kinds = sorted({a.kind for a in _EXTRA_ADAPTERS})
    raise UnsupportedError(
        f"extra_parallel_modules: diffpar cannot parallelize a {type(module).__name__}. Supported kinds: {kinds}. "
        "Remove it from extra_parallel_modules (it then runs replicated on every rank)."
    )
