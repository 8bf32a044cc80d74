"""Rank-side checks for enable_cache(cache_config=...) under context parallelism.

The inputs are built so that ranks' local skip decisions disagree: each "step" moves the image tokens of the last
context-parallel shard much more than the others, and the threshold is placed between what that shard sees and
what the whole sequence sees. Without a reduction one rank would skip the middle blocks (and their attention
all-to-alls) while another computes them.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist

import diffpar
from diffpar.cache import DBCacheConfig, cache_stats
from diffpar.testing import tiny_transformers


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def _cache_config(kind: str, threshold: float, **extra):
    if kind == "dbcache":
        return DBCacheConfig(residual_diff_threshold=threshold, **extra)
    if kind == "fbc":
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=threshold)
    if kind == "taylorseer":
        from diffusers import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32)
    if kind == "magcache":
        from diffusers import MagCacheConfig

        return MagCacheConfig(threshold=0.5, max_skip_steps=2, retention_ratio=0.0, num_inference_steps=extra["steps"],
                              mag_ratios=[1.0] * extra["steps"])
    if kind == "pab":
        from diffusers import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(-1, 1000),
                                               current_timestep_callback=lambda: 500)
    if kind == "seacache":
        from diffusers.hooks import SeaCacheConfig

        def raw_vision(module, args, kwargs):
            hidden = kwargs["hidden_states"][0]  # (seq, C): one frame of seq tokens, as (C, T=1, H=1, W=seq)
            return [hidden.T.reshape(hidden.shape[1], 1, 1, hidden.shape[0])]

        return SeaCacheConfig(threshold=threshold * 20, max_consecutive_cached=2, raw_vision_callback=raw_vision)
    raise ValueError(kind)


def step_inputs(base: dict, n_steps: int, shards: int, local_scale: float = 0.03, global_scale: float = 0.002):
    """Slowly changing inputs: every image token drifts a little, the last shard's tokens drift a lot."""
    g = torch.Generator().manual_seed(7)
    hidden = base["hidden_states"]
    seq = hidden.shape[1]
    last = slice(seq - seq // shards, seq)
    drift = torch.randn(hidden.shape, generator=g)
    local = torch.zeros_like(hidden)
    local[:, last] = torch.randn(local[:, last].shape, generator=g)
    steps = []
    for k in range(n_steps):
        x = dict(base)
        x["hidden_states"] = hidden + global_scale * k * drift + local_scale * k * local
        steps.append(x)
    return steps


def _front_residuals(model, steps, fn: int):
    """Hidden-states residual of the first `fn` blocks at every step (uncached model, one process)."""
    from diffpar.compat.diffusers_cache import block_metadata, transformer_blocks

    blocks = transformer_blocks(model)
    seen = {}
    md = block_metadata(blocks[fn - 1][1])

    def grab_in(module, args, kwargs):
        seen["in"] = kwargs.get("hidden_states", args[0] if args else None)

    def grab_out(module, args, kwargs, output):
        seen["out"] = output[md.return_hidden_states_index] if isinstance(output, tuple) else output

    h1 = blocks[0][1].register_forward_pre_hook(grab_in, with_kwargs=True)
    h2 = blocks[fn - 1][1].register_forward_hook(grab_out, with_kwargs=True)
    residuals = []
    with torch.no_grad():
        for x in steps:
            model(**copy.deepcopy(x))
            residuals.append(seen["out"] - seen["in"])
    h1.remove()
    h2.remove()
    return residuals


def _rel(cur, prev):
    return ((cur - prev).abs().sum() / prev.abs().sum()).item()


def divergent_threshold(residuals, shards: int) -> dict:
    """A threshold between the whole-sequence change and the most-moved shard's change at step 1 (vs step 0):
    the whole model (one process, or ranks that agree) skips step 1; the last shard alone would compute it."""
    cur, prev = residuals[1], residuals[0]
    per_shard = [_rel(c, p) for c, p in zip(cur.chunk(shards, dim=1), prev.chunk(shards, dim=1))]
    whole = _rel(cur, prev)
    threshold = math.sqrt(whole * max(per_shard))
    return {"threshold": threshold, "whole": whole, "per_shard": per_shard}


def _run_steps(model, steps, context="cond"):
    outs = []
    with torch.no_grad():
        for k, x in enumerate(steps):
            # Scheduler coordinates, for caches that read them (SeaCache, 0.41+); names only before 0.41.
            where = {}
            if compat_has_context_object():
                where = {"step_index": k, "num_inference_steps": len(steps), "sigma": 1.0 - k / len(steps)}
            with model.cache_context(context, **where):
                outs.append(_first(model(**copy.deepcopy(x))))
    return outs


def compat_has_context_object():
    from diffpar.compat.diffusers_cache import has_cache_context_object

    return has_cache_context_object()


def cache_equivalence(config: dict, kind: str = "dbcache", n_steps: int = 6, seq: int = 16, text: int = 8,
                      model_kwargs: dict | None = None, cache_kwargs: dict | None = None, unsynced: bool = False):
    """Cached one-process run vs cached parallel run over `n_steps` denoiser calls.

    Returns, on each rank: both skip patterns, the per-step max abs output difference, every decision (with the
    measure reduced over the model group and the one of this rank's shard), how many all-reduces the cache issued,
    a second run after a reset, and the output after detach vs the untouched model.
    """
    model_kwargs = {"layers": 2, "single_layers": 2, **(model_kwargs or {})}
    cache_kwargs = dict(cache_kwargs or {})
    model, make_inputs = tiny_transformers.build("flux", **model_kwargs)
    pristine = copy.deepcopy(model)
    cp = config.get("ulysses_size", 1) * config.get("ring_size", 1)
    steps = step_inputs(make_inputs(seq=seq, text=text), n_steps, shards=max(cp, 2))
    probe = divergent_threshold(_front_residuals(pristine, steps, cache_kwargs.get("Fn_compute_blocks", 1)),
                                max(cp, 2))
    if kind == "magcache":
        cache_kwargs["steps"] = n_steps

    reference_model = copy.deepcopy(model)
    diffpar.enable_cache(reference_model, cache_config=_cache_config(kind, probe["threshold"], **cache_kwargs))
    reference = _run_steps(reference_model, steps)
    reference_stats = cache_stats(reference_model) if kind in ("dbcache", "fbc") else None

    handle = diffpar.enable_cache(
        model, cache_config=_cache_config(kind, probe["threshold"], **cache_kwargs),
        parallelism_config=diffpar.ParallelismConfig(**config),
    )
    sync = handle.state("cache").sync
    if unsynced:
        sync.group = None  # what every diffusers cache does on its own: decide from this rank's shard
    parallel = _run_steps(model, steps)
    stats = handle.state("cache").stats
    result = {
        "rank": dist.get_rank(),
        "probe": probe,
        "implementation": handle.state("cache").implementation,
        "group_size": handle.state("cache").group_size,
        "diffs": [(p - r).abs().max().item() for p, r in zip(parallel, reference)],
        # How far the cache moved the one-process output from the uncached model: > 0 means steps were skipped.
        "cache_effect": max((r - u).abs().max().item() for r, u in zip(reference, _run_steps(pristine, steps))),
        "collectives": sync.collectives,
        "steps": handle.step_names,
    }
    if reference_stats is not None:
        result.update(
            pattern=stats.pattern(),
            reference_pattern=reference_stats.pattern(),
            decisions=[(d.step, d.computed, d.reason, d.diff, d.local_diff) for d in stats.decisions],
            computed=stats.computed,
            skipped=stats.skipped,
        )
        # A pipeline resets stateful hooks at the end of each call; the next run must start over.
        model._reset_stateful_cache()
        stats.reset()
        _run_steps(model, steps[:3])
        result["after_reset_pattern"] = stats.pattern()
        result["after_reset_reasons"] = [d.reason for d in stats.decisions]

    handle.detach()
    with torch.no_grad():
        after = _first(model(**copy.deepcopy(steps[-1])))
        untouched = _first(pristine(**copy.deepcopy(steps[-1])))
    result["detach_equal"] = torch.equal(after, untouched)
    result["leftover_hooks"] = sorted(
        name for name, m in model.named_modules()
        if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks
    )
    return result


def bad_cache_config(config: dict, cache):
    """enable_cache with an invalid cache config: must raise the same error on every rank, before any collective."""
    model, _ = tiny_transformers.build("flux", layers=1, single_layers=1)
    diffpar.enable_cache(model, cache_config=cache, parallelism_config=diffpar.ParallelismConfig(**config))


def pipeline_cache(ulysses_size: int = 2, n_steps: int = 6, calls: int = 2):
    """A whole tiny FluxPipeline with a DBCache, Ulysses over the world vs one process: the skip pattern of each
    call, the image difference, and the pattern of a second call (the pipeline resets the cache between calls)."""
    from diffpar.testing import tiny_pipelines

    def build():
        return tiny_pipelines.build_tiny_flux_pipeline(layers=2, single_layers=2)

    def generate(p):
        with torch.no_grad():
            return p("a photo of a cat", height=32, width=32, num_inference_steps=n_steps, max_sequence_length=16,
                     generator=torch.Generator().manual_seed(0), output_type="pt").images

    # Place the threshold at the median step-to-step change of this pipeline, so some steps skip and some do not.
    reference = build()
    probe = diffpar.enable_cache(reference, cache_config=DBCacheConfig(Bn_compute_blocks=1, residual_diff_threshold=0))
    generate(reference)
    diffs = sorted(d.diff for d in cache_stats(reference).decisions if d.diff is not None)
    probe.detach()
    threshold = diffs[len(diffs) // 2]
    cache = DBCacheConfig(Bn_compute_blocks=1, residual_diff_threshold=threshold)

    diffpar.enable_cache(reference, cache_config=cache)
    reference_images, reference_patterns = [], []
    for _ in range(calls):
        reference_images.append(generate(reference))
        reference_patterns.append(cache_stats(reference).pattern())
        cache_stats(reference).reset()

    pipe = build()
    handle = diffpar.enable_cache(pipe, cache_config=cache,
                                  parallelism_config=diffpar.ParallelismConfig(ulysses_size=ulysses_size))
    images, patterns = [], []
    for _ in range(calls):
        images.append(generate(pipe))
        patterns.append(cache_stats(pipe).pattern())
        cache_stats(pipe).reset()
    result = {
        "rank": dist.get_rank(),
        "threshold": threshold,
        "patterns": patterns,
        "reference_patterns": reference_patterns,
        "image_diffs": [(a - b).abs().max().item() for a, b in zip(images, reference_images)],
        "collectives": handle.state("cache").sync.collectives,
    }
    handle.detach()
    return result
