"""Everything about diffusers' cache machinery that differs between releases (0.36 onward), and the points where
a diffusers cache takes a decision that under context parallelism must be the same on every rank.

Release facts this module relies on (read from the 0.36.0, 0.40.0 and 0.42.1 wheels):
- `CacheMixin.enable_cache(config)` / `disable_cache()` apply and remove every cache; configs by release:
  FirstBlockCache, FasterCache, PyramidAttentionBroadcast, TaylorSeer (0.36), MagCache (0.37), TextKVCache
  (0.38), SeaCache (0.41).
- Hook state lives in `StateManager`s keyed by the cache context. Up to 0.40 the context is a name
  (`set_context(name)`, `_current_context`); from 0.41 it is a `CacheContext(name, step_index=..., ...)`
  (`set_context(ctx)`, `_context`) and `cache_context(name, **kw)` takes the loop position.
- Pipelines wrap each denoiser call in `transformer.cache_context("cond"/"uncond")` and reset every stateful hook
  at the end of `__call__` (`maybe_free_model_hooks` -> `_reset_stateful_cache`), in every release read.
- Block metadata (`TransformerBlockRegistry`) names the hidden-states argument from 0.40 and the
  encoder-states argument from 0.42; before, both names were fixed.
- 0.40 caches the list of child hook registries and does not invalidate it when hooks are added later; 0.42
  has `invalidate_child_registries_cache()`. We invalidate after every change, on every release.

Which decisions are local (computed from this rank's activations) and so need a reduction:
- FirstBlockCache: `FBCHeadBlockHook._should_compute_remaining_blocks` compares mean |residual change| of the
  first block on the local shard: patched to reduce the sums over the model group (exact, one all-reduce).
- SeaCache: `SeaCacheSharedState.resolve_gate` measures an indicator that a user callback may build from local
  data: patched to a vote (compute if any rank computes). Its Cosmos 3 path already votes itself.
- TaylorSeer (step counter and interval), MagCache (step counter and precomputed ratios), FasterCache and
  PyramidAttentionBroadcast (timestep callback and iteration counters), TextKVCache (no skip decision): the
  decision depends on no activation, so every rank takes the same one without help.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from functools import lru_cache

import torch

from diffpar.errors import DiffparError, UnsupportedError
from diffpar.patch import Patch
from . import versions

logger = logging.getLogger("diffpar")

# diffusers' config class name -> (module that defines it, whose decision is activation-dependent)
_NATIVE_CACHES = {
    "FirstBlockCacheConfig": ("diffusers.hooks.first_block_cache", "reduced"),
    "TaylorSeerCacheConfig": ("diffusers.hooks.taylorseer_cache", "step-driven"),
    "MagCacheConfig": ("diffusers.hooks.mag_cache", "step-driven"),
    "FasterCacheConfig": ("diffusers.hooks.faster_cache", "step-driven"),
    "PyramidAttentionBroadcastConfig": ("diffusers.hooks.pyramid_attention_broadcast", "step-driven"),
    "TextKVCacheConfig": ("diffusers.hooks.text_kv_cache", "no decision"),
    "SeaCacheConfig": ("diffusers.hooks.sea_cache", "voted"),
}

# Child names that hold transformer blocks, when diffusers does not expose its own list.
_FALLBACK_BLOCK_LISTS = (
    "blocks", "transformer_blocks", "single_transformer_blocks", "layers", "visual_transformer_blocks",
    "temporal_transformer_blocks",
)


# ---------------------------------------------------------------------------------------------------------------
# Hook base classes and cache contexts
# ---------------------------------------------------------------------------------------------------------------


def base_state_class():
    from diffusers.hooks.hooks import BaseState

    return BaseState


def model_hook_class():
    from diffusers.hooks.hooks import ModelHook

    return ModelHook


def new_state_manager(state_cls):
    from diffusers.hooks.hooks import StateManager

    return StateManager(state_cls)


@lru_cache(None)
def has_cache_context_object() -> bool:
    """0.41+: contexts are `CacheContext` objects; before, plain names."""
    from diffusers.hooks import hooks

    return hasattr(hooks, "CacheContext")


def context_name(state_manager) -> str | None:
    if has_cache_context_object():
        ctx = getattr(state_manager, "_context", None)
        return None if ctx is None else ctx.name
    return getattr(state_manager, "_current_context", None)


def ensure_context(state_manager, default: str = "default") -> None:
    """Calls outside any `cache_context` (a bare model in a user loop) share one default context."""
    if context_name(state_manager) is not None:
        return
    if has_cache_context_object():
        from diffusers.hooks.hooks import CacheContext

        state_manager.set_context(CacheContext(name=default))
    else:
        state_manager.set_context(default)


def invalidate_child_registries(model: torch.nn.Module) -> None:
    """Forget every cached list of child hook registries under `model` (stale after hooks were added/removed)."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and hasattr(registry, "_child_registries_cache"):
            registry._child_registries_cache = None


def hook_state(module: torch.nn.Module) -> tuple[bool, bool]:
    """(has a diffusers hook registry, has its own `forward` instance attribute): what `remove_hook_exactly`
    restores."""
    return "_diffusers_hook" in vars(module), "forward" in vars(module)


def register_hook(module: torch.nn.Module, hook, hook_name: str) -> None:
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, hook_name)


def remove_hook_exactly(module: torch.nn.Module, hook_name: str, before: tuple[bool, bool]) -> None:
    """Remove one hook (absent: nothing to do) and leave `module` as it was in state `before`: diffusers leaves an
    empty registry and the original bound `forward` as an instance attribute behind; drop both where they are
    new."""
    registry = vars(module).get("_diffusers_hook")
    if registry is None:
        return
    registry.remove_hook(hook_name, recurse=False)
    had_registry, had_forward = before
    if not had_registry and not registry.hooks:
        del module._diffusers_hook
        if not had_forward and "forward" in vars(module):
            del module.forward


# ---------------------------------------------------------------------------------------------------------------
# Transformer blocks
# ---------------------------------------------------------------------------------------------------------------


def block_list_names() -> tuple[str, ...]:
    try:
        from diffusers.hooks._common import _ALL_TRANSFORMER_BLOCK_IDENTIFIERS

        return tuple(_ALL_TRANSFORMER_BLOCK_IDENTIFIERS)
    except ImportError:  # pragma: no cover - every supported release has it
        return _FALLBACK_BLOCK_LISTS


def transformer_blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The model's repeated blocks in execution order, as diffusers' own caches find them."""
    names = set(block_list_names())
    found = []
    for child_name, child in model.named_children():
        if child_name in names and isinstance(child, torch.nn.ModuleList):
            found.extend((f"{child_name}.{i}", block) for i, block in enumerate(child))
    return found


def block_metadata(block: torch.nn.Module):
    """diffusers' `TransformerBlockMetadata` for this block class (which output is hidden / encoder states),
    or None when diffusers does not know the class."""
    from diffusers.hooks._helpers import TransformerBlockRegistry

    try:
        return TransformerBlockRegistry.get(type(block))
    except ValueError:
        return None


def block_argument(metadata, which: str, args, kwargs):
    """A block call's `hidden_states` / `encoder_hidden_states` argument. The metadata names the argument from
    0.40 (`hidden_states_argument_name`) and 0.42 (`encoder_hidden_states_argument_name`); before, the names were
    fixed."""
    name = getattr(metadata, f"{which}_argument_name", which)
    if which == "hidden_states" and metadata._cls is not None:
        params = list(inspect.signature(metadata._cls.forward).parameters)[1:]
        if name not in params and params:
            # diffusers registers some blocks with the default name although their forward calls it otherwise
            # (ZImageTransformerBlock.forward(x, ...), 0.37-0.42.1): the first parameter is the hidden states.
            name = params[0]
    return metadata._get_parameter_from_args_kwargs(name, args, kwargs)


# ---------------------------------------------------------------------------------------------------------------
# diffusers' own cache configs
# ---------------------------------------------------------------------------------------------------------------


@lru_cache(None)
def native_cache_configs() -> dict[str, type]:
    """The diffusers cache config classes the installed release has, by name."""
    found = {}
    for name, (module_name, _) in _NATIVE_CACHES.items():
        try:
            found[name] = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue
    return found


def native_cache_kind(config) -> str | None:
    """The config's class name if it is a diffusers cache config of the installed release, else None."""
    for name, cls in native_cache_configs().items():
        if isinstance(config, cls):
            return name
    return None


def check_native_cache(model: torch.nn.Module, config, model_name: str) -> None:
    """Local checks, no collectives."""
    from diffusers.models.cache_utils import CacheMixin

    kind = native_cache_kind(config)
    if not isinstance(model, CacheMixin):
        raise UnsupportedError(
            f"cache_config={kind}: {model_name} ({type(model).__name__}) is not a diffusers CacheMixin model, so "
            "diffusers' caches cannot be applied to it. Use diffpar.DBCacheConfig, which works on any model whose "
            "blocks diffusers registers."
        )
    if model.is_cache_enabled:
        raise DiffparError(
            f"{model_name} already has a diffusers cache enabled ({type(model._cache_config).__name__}); a second "
            "one would stack on it. Call model.disable_cache() first and pass the cache you want as cache_config."
        )
    if kind in ("FirstBlockCacheConfig", "SeaCacheConfig") and len(transformer_blocks(model)) < 2:
        raise UnsupportedError(
            f"cache_config={kind} needs at least 2 transformer blocks (a first block that decides and a rest to "
            f"skip); {model_name} has {len(transformer_blocks(model))}."
        )
    if kind == "FirstBlockCacheConfig" and _fbc_decision_point() is None:
        raise UnsupportedError(
            f"FirstBlockCache in diffusers {versions.version_of('diffusers')} has no decision method diffpar knows "
            "how to synchronize across ranks; use diffpar.DBCacheConfig(Fn_compute_blocks=1, "
            "residual_diff_threshold=...) instead, which is the same cache."
        )


@lru_cache(None)
def _fbc_decision_point():
    """(hook class, decision method name, hook name) of FirstBlockCache, or None when unrecognized."""
    try:
        from diffusers.hooks import first_block_cache as fbc
    except ImportError:
        return None
    hook_cls = getattr(fbc, "FBCHeadBlockHook", None)
    name = "_should_compute_remaining_blocks"
    if hook_cls is None or not hasattr(hook_cls, name) or not hasattr(fbc, "FBCSharedBlockState"):
        return None
    if not hasattr(fbc.FBCSharedBlockState(), "head_block_residual"):
        return None
    return hook_cls, name, getattr(fbc, "_FBC_LEADER_BLOCK_HOOK", "fbc_leader_block_hook")


def _registry_snapshot(model: torch.nn.Module) -> dict[int, tuple[bool, bool]]:
    """Per module: (has a hook registry, has its own `forward` instance attribute)."""
    return {id(m): ("_diffusers_hook" in vars(m), "forward" in vars(m)) for m in model.modules()}


def _drop_new_empty_registries(model: torch.nn.Module, before: dict[int, tuple[bool, bool]]) -> None:
    """diffusers' `disable_cache` leaves an empty registry and the original bound `forward` as an instance
    attribute on each module it hooked: remove both where the cache created them, so detach is exact."""
    for module in model.modules():
        registry = vars(module).get("_diffusers_hook")
        had_registry, had_forward = before.get(id(module), (False, False))
        if registry is None or had_registry or registry.hooks:
            continue
        del module._diffusers_hook
        if not had_forward and "forward" in vars(module):
            del module.forward


def _hooks_named(model: torch.nn.Module, hook_name: str):
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(hook_name) is not None:
            yield registry.get_hook(hook_name)


def apply_native_cache(model, config, sync, stats, model_name: str, handle) -> str:
    """`model.enable_cache(config)`, then synchronize its local decision points. Returns how decisions agree."""
    kind = native_cache_kind(config)
    agreement = _NATIVE_CACHES[kind][1]
    before = _registry_snapshot(model)

    def disable():
        if getattr(model, "is_cache_enabled", False):
            model.disable_cache()
        _drop_new_empty_registries(model, before)
        invalidate_child_registries(model)

    handle.add(f"{model_name}: diffusers {kind}", disable)  # before the change: a failure inside is undone too
    model.enable_cache(config)
    invalidate_child_registries(model)

    if kind == "FirstBlockCacheConfig":
        hook_cls, method, hook_name = _fbc_decision_point()
        for hook in _hooks_named(model, hook_name):
            what = "reduced over the model group" if sync.active else "observed (one process: nothing to reduce)"
            patches: list[Patch] = []
            handle.add(f"{model_name}: FirstBlockCache decision {what}", lambda patches=patches: [p.undo() for p in patches])
            patches.append(Patch(hook, method, _fbc_decision_wrapper(sync, stats, model_name),
                                 label=f"{model_name}: FirstBlockCache decision"))
    elif kind == "SeaCacheConfig":
        stats.tracked = False
        if sync.active:
            from diffusers.hooks import sea_cache

            seen = set()
            for hook in _hooks_named(model, getattr(sea_cache, "_SEA_CACHE_LEADER_BLOCK_HOOK", "")):
                shared = getattr(hook, "shared_state", None)
                if shared is None or id(shared) in seen or not hasattr(shared, "resolve_gate"):
                    continue
                seen.add(id(shared))
                patches: list[Patch] = []
                handle.add(f"{model_name}: SeaCache gate voted over the model group",
                           lambda patches=patches: [p.undo() for p in patches])
                patches.append(Patch(shared, "resolve_gate", _sea_gate_vote_wrapper(sync),
                                     label=f"{model_name}: SeaCache gate"))
    else:
        stats.tracked = False
    return agreement


def _fbc_decision_wrapper(sync, stats, model_name: str):
    """FirstBlockCache's decision with the measure reduced over the model group.

    diffusers computes mean|r - r_prev| / mean|r_prev| on the local shard (r: the first block's hidden-states
    residual, r_prev: the one of the last computed step) and computes the rest when it exceeds the threshold. We
    all-reduce the two sums instead, which gives every rank the one-process value.
    """
    def wrapper(wrapped, instance, args, kwargs):
        residual = args[0] if args else kwargs["hidden_states_residual"]
        state = instance.state_manager.get_state()
        step = stats.next_step(state)
        context = context_name(instance.state_manager)
        previous = state.head_block_residual
        if previous is None:
            stats.record_decision(model_name, context, step, True, "first step")
            return True
        if not sync.active:
            computed = bool(wrapped(*args, **kwargs))
            stats.record_decision(model_name, context, step, computed,
                                  "diff above threshold" if computed else "diff within threshold")
            return computed
        diff, local_diff = sync.relative_l1(residual, previous)
        computed = diff > instance.threshold
        stats.record_decision(model_name, context, step, computed,
                              "diff above threshold" if computed else "diff within threshold", diff, local_diff)
        return computed

    return wrapper


def _sea_gate_vote_wrapper(sync):
    """SeaCache's gate, then a vote: every rank computes when any rank would. A rank outvoted into computing
    forgets the distance it had accumulated, as SeaCache itself does when its Cosmos 3 vote overrides it."""

    def wrapper(wrapped, instance, args, kwargs):
        state = args[0] if args else kwargs["state"]
        local = bool(wrapped(*args, **kwargs))
        agreed = sync.any(local)
        if agreed and not local:
            state.accumulated_distance = 0.0
            state.gate_should_compute = True
        return agreed

    return wrapper


def reset_stateful_hooks(model: torch.nn.Module) -> None:
    """Forget cached state in every diffusers hook of `model` (what pipelines do at the end of a call)."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry.reset_stateful_hooks(recurse=False)
