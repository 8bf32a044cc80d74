"""`enable_cache(target, cache_config=...)`: step caches that stay in lockstep across ranks.

`cache_config` is either diffpar's `DBCacheConfig` or one of diffusers' own cache configs (FirstBlockCacheConfig,
TaylorSeerCacheConfig, MagCacheConfig, FasterCacheConfig, PyramidAttentionBroadcastConfig, and TextKVCacheConfig /
SeaCacheConfig where the installed release has them). It is applied to every denoiser of a pipeline. Whenever a
cache decides from activations (which, under context parallelism, each rank only holds a shard of), the decision
is reduced over the ranks that share the model, so all of them skip or compute together.

`plan_cache` does every check (no collective) and returns the cache's ComponentPlan; `apply_cache` carries it
out; `cache_stats` / `reset_cache` read the applied cache through the handle.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from diffpar.cache_config import DBCacheConfig, describe_cache
from diffpar.compat import diffusers_cache as compat
from diffpar.components import find_denoisers
from diffpar.engines.cache_sync import CacheStats, DecisionSync, apply_dbcache, plan_dbcache
from diffpar.errors import DiffparError
from diffpar.plan_types import ComponentPlan

logger = logging.getLogger("diffpar")


def accepted_configs() -> list[str]:
    return ["diffpar.DBCacheConfig", *(f"diffusers.{name}" for name in compat.native_cache_configs())]


@dataclass(frozen=True)
class CachePlan:
    """What `check_cache` decided: diffusers' hook (with which config) or diffpar's, per denoiser."""

    denoisers: tuple
    native_config: object = None  # the diffusers config to apply, when a diffusers hook does the job
    dbcache_plans: dict = field(default_factory=dict)


@dataclass
class CacheRuntime:
    """The applied cache (`handle.state("cache")`): what decides, its statistics, and the decision sync."""

    config: object
    implementation: dict
    stats: CacheStats
    sync: DecisionSync

    @property
    def group_size(self) -> int:
        return self.sync.size


def check_cache(target, cache_config) -> CachePlan:
    """Every local check of `cache_config` against `target`; no collectives, no change. Raises DiffparError /
    UnsupportedError with what to do."""
    native_kind = compat.native_cache_kind(cache_config)
    if not isinstance(cache_config, DBCacheConfig) and native_kind is None:
        raise DiffparError(
            f"cache_config must be one of {accepted_configs()}, got {type(cache_config).__name__}. (Configs of "
            "other caching libraries are not read: rewrite it as a DBCacheConfig.)"
        )
    denoisers = tuple(find_denoisers(target))
    native_config = None
    if native_kind is not None:
        native_config = cache_config
    elif cache_config.is_first_block_cache:
        fbc = compat.native_cache_configs().get("FirstBlockCacheConfig")
        if fbc is not None and all(_is_cache_mixin(m) for _, m in denoisers):
            native_config = fbc(threshold=cache_config.residual_diff_threshold)
    dbcache_plans = {}
    for name, model in denoisers:
        if _is_cache_mixin(model) and model.is_cache_enabled:
            raise DiffparError(
                f"{name} already has a diffusers cache enabled ({type(model._cache_config).__name__}); a second "
                "cache would stack on it and its decisions would not be synchronized across ranks. Call "
                f"{name}.disable_cache() first and pass the cache you want as cache_config."
            )
        if native_config is not None:
            compat.check_native_cache(model, native_config, name)
        else:
            dbcache_plans[name] = plan_dbcache(model, cache_config, name)
    return CachePlan(denoisers=denoisers, native_config=native_config, dbcache_plans=dbcache_plans)


def plan_cache(target, cache_config, model_group_size: int) -> ComponentPlan:
    """The cache's ComponentPlan: which implementation runs on which denoiser, agreed over `model_group_size`
    ranks (the ranks that hold shards of one model copy; 1: no agreement needed)."""
    checked = check_cache(target, cache_config)
    if checked.native_config is not None:
        how = f"diffusers {type(checked.native_config).__name__} hooks, decision reduced across ranks"
    else:
        how = "diffpar DBCache hooks, decision reduced across ranks"
    return ComponentPlan(
        name="cache", role="cache", module_class=type(cache_config).__name__, engine="cache sync",
        group=f"model copy ({model_group_size} ranks)" if model_group_size > 1 else "each process alone",
        source=how,
        details=tuple(f"{name}: {type(model).__name__}" for name, model in checked.denoisers),
        facts=ComponentPlan.freeze_facts(describe_cache(cache_config)),
        payload=(cache_config, checked),
    )


def apply_cache(plan: ComponentPlan, handle, group) -> CacheRuntime:
    """Attach the planned cache to every denoiser; `group` is the model-copy process group (None: no sync).

    Runs before the context-parallel hooks are registered (see apply.py). Issues no collective: the group was
    created beforehand.
    """
    cache_config, checked = plan.payload
    sync = DecisionSync(group)
    stats = CacheStats()
    implementations = {}
    for name, model in checked.denoisers:
        if checked.native_config is not None:
            agreement = compat.apply_native_cache(model, checked.native_config, sync, stats, name, handle)
            implementations[name] = f"diffusers {type(checked.native_config).__name__} ({agreement})"
        else:
            apply_dbcache(model, checked.dbcache_plans[name], cache_config, sync, stats, name, handle)
            implementations[name] = "diffpar DBCache hooks (reduced)"
    logger.info("diffpar: cache %s on %s", type(cache_config).__name__, implementations)
    return CacheRuntime(config=cache_config, implementation=implementations, stats=stats, sync=sync)


def _is_cache_mixin(model) -> bool:
    from diffusers.models.cache_utils import CacheMixin

    return isinstance(model, CacheMixin)


def cache_stats(target):
    """What the cache decided so far (`CacheStats`: `.computed`, `.skipped`, `.pattern()`, `.decisions`)."""
    handle = getattr(target, "_diffpar_handle", None)
    if handle is None or "cache" not in handle.states:
        raise DiffparError(
            f"no diffpar cache is enabled on this {type(target).__name__}: call "
            "diffpar.enable_cache(target, cache_config=...) first."
        )
    return handle.state("cache").stats


def reset_cache(target) -> None:
    """Forget cached residuals, as diffusers pipelines do at the end of each call. Call it between runs of your
    own denoising loop over a bare model (every rank must call it, as every rank runs the loop)."""
    for _, model in find_denoisers(target):
        compat.reset_stateful_hooks(model)


__all__ = [
    "DBCacheConfig", "plan_cache", "apply_cache", "check_cache", "describe_cache", "cache_stats", "reset_cache",
    "accepted_configs", "CacheRuntime",
]
