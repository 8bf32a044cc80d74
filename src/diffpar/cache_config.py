"""`DBCacheConfig`, diffpar's own cache config, and the rank-comparable summary of any cache config."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from diffpar.errors import DiffparError


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


def describe_cache(cache_config) -> dict:
    """A rank-comparable summary: ranks given different thresholds would take different decisions."""
    if cache_config is None:
        return {}
    def value(v):
        # Callbacks (PyramidAttentionBroadcast's timestep callback, ...) differ by address on every rank.
        return "<callable>" if callable(v) else repr(v)

    fields = getattr(cache_config, "__dataclass_fields__", {})
    return {"type": type(cache_config).__name__, **{k: value(getattr(cache_config, k)) for k in sorted(fields)}}
