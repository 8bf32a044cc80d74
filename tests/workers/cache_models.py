"""DBCache under context parallelism on transformers whose plan splits at their first block (QwenImage, Z-Image):
the cache's entry hook must measure the shard the block computes on."""
from __future__ import annotations

import copy

import torch

import diffpar
from diffpar.cache import DBCacheConfig, cache_stats
from diffpar.testing import tiny_transformers

from .cache import _run_steps as _run_steps_in_context


def _run_steps(model, steps):
    if hasattr(model, "cache_context"):
        return _run_steps_in_context(model, steps)
    with torch.no_grad():  # models without CacheMixin (Z-Image): diffpar's default cache context
        return [model(**copy.deepcopy(x)) for x in steps]


def _perturbed(inputs: dict, step: int) -> dict:
    out = copy.deepcopy(inputs)
    g = torch.Generator().manual_seed(100 + step)
    for key in ("hidden_states", "x"):
        value = out.get(key)
        if isinstance(value, torch.Tensor):
            out[key] = value + 0.02 * step * torch.randn(value.shape, generator=g)
        elif isinstance(value, list):
            out[key] = [v + 0.02 * step * torch.randn(v.shape, generator=g) for v in value]
    return out


def _first_output(out):
    out = out[0] if isinstance(out, (tuple, list)) else out
    return torch.stack(out) if isinstance(out, list) else out


def dbcache_first_block_split(model_name: str, config: dict, threshold: float = 0.05, n_steps: int = 6):
    model, make_inputs = tiny_transformers.build(model_name, heads=4)
    base = make_inputs(seq=16, text=8)
    steps = [_perturbed(base, k // 2) for k in range(n_steps)]  # pairs of equal inputs: some steps skip
    cache = dict(residual_diff_threshold=threshold, Fn_compute_blocks=1, Bn_compute_blocks=0)

    reference_model = copy.deepcopy(model)
    diffpar.enable_cache(reference_model, cache_config=DBCacheConfig(**cache))
    reference = [_first_output(o) for o in _run_steps(reference_model, steps)]
    diffpar.enable_cache(model, cache_config=DBCacheConfig(**cache),
                         parallelism_config=diffpar.ParallelismConfig(**config))
    outputs = [_first_output(o) for o in _run_steps(model, steps)]
    result = {
        "diff": max((a - b).abs().max().item() for a, b in zip(outputs, reference)),
        "pattern": cache_stats(model).pattern(),
        "reference_pattern": cache_stats(reference_model).pattern(),
    }
    diffpar.disable_cache(model)
    diffpar.disable_cache(reference_model)
    return result

