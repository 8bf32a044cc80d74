"""`enable_cache(target, cache_config=...)`: step caches that stay in lockstep across ranks.

`cache_config` is either diffpar's `DBCacheConfig` or one of diffusers' own cache configs (FirstBlockCacheConfig,
TaylorSeerCacheConfig, MagCacheConfig, FasterCacheConfig, PyramidAttentionBroadcastConfig, and TextKVCacheConfig /
SeaCacheConfig where the installed release has them). It is applied to every denoiser of a pipeline, after
parallelism. Whenever a cache decides from activations (which, under context parallelism, each rank only holds a
shard of), the decision is reduced over the ranks that share the model, so all of them skip or compute together.
"""
from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field

import torch.distributed as dist

from .compat import diffusers_cache as compat
from .errors import DiffparError

logger = logging.getLogger("diffpar")


@dataclass
class DBCacheConfig:
    """Dual-block cache: always compute the first `Fn_compute_blocks` and the last `Bn_compute_blocks` transformer
    blocks; skip the blocks in between (adding the residual they produced at the last computed step) when the
    first blocks' residual changed little.

    Fn_compute_blocks: blocks always computed at the front; their output residual is what the cache watches.
    Bn_compute_blocks: blocks always computed at the back, refining a cached step's output (0: none).
    residual_diff_threshold: skip when sum|r - r_last| / sum|r_last| <= this, r being the front blocks' residual
        (output minus input hidden states) and r_last the one of the last computed step. Measured over the whole
        sequence, across ranks.
    max_warmup_steps: the first steps of each run (and cache context) always compute.
    max_continuous_cached_steps: at most this many skipped steps in a row (None or -1: no cap).
    max_cached_steps: at most this many skipped steps per run (None or -1: no cap).

    With Fn_compute_blocks=1, Bn_compute_blocks=0 and no warmup or caps this is diffusers' FirstBlockCache, and
    diffpar applies that one (with its decision reduced across ranks).
    """

    Fn_compute_blocks: int = 1
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 0
    max_continuous_cached_steps: int | None = None
    max_cached_steps: int | None = None

    def __post_init__(self):
        def integer(name, minimum):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise DiffparError(f"DBCacheConfig: {name} must be an integer >= {minimum}, got {value!r}.")

        integer("Fn_compute_blocks", 1)
        integer("Bn_compute_blocks", 0)
        integer("max_warmup_steps", 0)
        for name in ("max_continuous_cached_steps", "max_cached_steps"):
            value = getattr(self, name)
            if value is None or value == -1:
                setattr(self, name, None)
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffparError(
                    f"DBCacheConfig: {name} must be a positive integer, or None / -1 for no cap, got {value!r}."
                )
        threshold = self.residual_diff_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
            raise DiffparError(
                f"DBCacheConfig: residual_diff_threshold must be a number >= 0 (a relative change; 0.05-0.2 is "
                f"typical), got {threshold!r}."
            )
        self.residual_diff_threshold = float(threshold)

    @property
    def is_first_block_cache(self) -> bool:
        """Whether diffusers' FirstBlockCache computes exactly this cache."""
        return (
            self.Fn_compute_blocks == 1
            and self.Bn_compute_blocks == 0
            and self.max_warmup_steps == 0
            and self.max_continuous_cached_steps is None
            and self.max_cached_steps is None
        )


def accepted_configs() -> list[str]:
    return ["diffpar.DBCacheConfig", *(f"diffusers.{name}" for name in compat.native_cache_configs())]


def model_group(handle):
    """The process group of the ranks that hold one copy of the denoiser (shards of it), or None when each
    process holds a whole copy (no parallelism, or a world of 1)."""
    dims, mesh = handle.info.get("dims"), handle.info.get("mesh")
    if dims is None or mesh is None or dims.ulysses * dims.ring * dims.tp == 1:
        return None
    if dims.dp == 1:
        return dist.group.WORLD
    # Several model copies (dp > 1): agree within this copy only; other copies decide for their own inputs.
    return mesh["ring", "ulysses", "tp"]._flatten().get_group()


@dataclass
class CachePlan:
    """What `check_cache` decided: diffusers' hook (with which config) or diffpar's, per denoiser."""

    denoisers: list
    native_config: object = None  # the diffusers config to apply, when a diffusers hook does the job
    dbcache_plans: dict = field(default_factory=dict)


def check_cache(target, cache_config) -> CachePlan:
    """Every local check of `cache_config` against `target`; no collectives. Raises DiffparError /
    UnsupportedError with what to do. Safe to call among enable_cache's local checks, before the agreement."""
    from .api import find_denoisers
    from .hooks.cache_sync import plan_dbcache

    native_kind = compat.native_cache_kind(cache_config)
    if not isinstance(cache_config, DBCacheConfig) and native_kind is None:
        raise DiffparError(
            f"cache_config must be one of {accepted_configs()}, got {type(cache_config).__name__}. (Configs of "
            "other caching libraries are not read: rewrite it as a DBCacheConfig.)"
        )
    plan = CachePlan(denoisers=find_denoisers(target))
    if native_kind is not None:
        plan.native_config = cache_config
    elif cache_config.is_first_block_cache:
        fbc = compat.native_cache_configs().get("FirstBlockCacheConfig")
        if fbc is not None and all(_is_cache_mixin(m) for _, m in plan.denoisers):
            plan.native_config = fbc(threshold=cache_config.residual_diff_threshold)
    for name, model in plan.denoisers:
        if _is_cache_mixin(model) and model.is_cache_enabled:
            raise DiffparError(
                f"{name} already has a diffusers cache enabled ({type(model._cache_config).__name__}); a second "
                "cache would stack on it and its decisions would not be synchronized across ranks. Call "
                f"{name}.disable_cache() first and pass the cache you want as cache_config."
            )
        if plan.native_config is not None:
            compat.check_native_cache(model, plan.native_config, name)
        else:
            plan.dbcache_plans[name] = plan_dbcache(model, cache_config, name)
    return plan


def describe_cache(cache_config) -> dict:
    """A rank-comparable summary: ranks given different thresholds would take different decisions."""
    if cache_config is None:
        return {}
    def value(v):
        # Callbacks (PyramidAttentionBroadcast's timestep callback, ...) differ by address on every rank.
        return "<callable>" if callable(v) else repr(v)

    fields = getattr(cache_config, "__dataclass_fields__", {})
    return {"type": type(cache_config).__name__, **{k: value(getattr(cache_config, k)) for k in sorted(fields)}}


def enable_cache_hooks(target, cache_config, handle) -> None:
    """Apply `cache_config` to every denoiser of `target` (a pipeline or a model); record each undo on `handle`.

    Runs on every rank once the mesh exists and before the context-parallel hooks are registered (see api.py).
    All checks come before the only collective here (creating the model group when it is a sub-group), so a bad
    config raises the same error on every rank.
    """
    from .hooks.cache_sync import CacheStats, DecisionSync, apply_dbcache

    if cache_config is None:
        return
    plan = check_cache(target, cache_config)
    sync = DecisionSync(model_group(handle))
    stats = CacheStats()
    implementations = {}
    for name, model in plan.denoisers:
        if plan.native_config is not None:
            agreement = compat.apply_native_cache(model, plan.native_config, sync, stats, name, handle)
            implementations[name] = f"diffusers {type(plan.native_config).__name__} ({agreement})"
        else:
            undo = apply_dbcache(model, plan.dbcache_plans[name], cache_config, sync, stats, name)
            handle.add(f"{name}: diffpar DBCache hooks", undo)
            implementations[name] = "diffpar DBCache hooks (reduced)"
    handle.info["cache"] = {
        "config": cache_config,
        "implementation": implementations,
        "stats": stats,
        "sync": sync,
        "group_size": sync.size,
    }
    logger.info("diffpar: cache %s on %s", type(cache_config).__name__, implementations)


def _is_cache_mixin(model) -> bool:
    from diffusers.models.cache_utils import CacheMixin

    return isinstance(model, CacheMixin)


def cache_stats(target):
    """What the cache decided so far (`CacheStats`: `.computed`, `.skipped`, `.pattern()`, `.decisions`)."""
    handle = getattr(target, "_diffpar_handle", None)
    if handle is None or "cache" not in handle.info:
        raise DiffparError(
            f"no diffpar cache is enabled on this {type(target).__name__}: call "
            "diffpar.enable_cache(target, cache_config=...) first."
        )
    return handle.info["cache"]["stats"]


def reset_cache(target) -> None:
    """Forget cached residuals, as diffusers pipelines do at the end of each call. Call it between runs of your
    own denoising loop over a bare model (every rank must call it, as every rank runs the loop)."""
    from .api import find_denoisers

    for _, model in find_denoisers(target):
        for module in model.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                registry.reset_stateful_hooks(recurse=False)


__all__ = [
    "DBCacheConfig", "enable_cache_hooks", "check_cache", "describe_cache", "cache_stats", "reset_cache",
    "accepted_configs",
]
