"""Rank-side checks that show why each compat shim exists, by running diffusers without it."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.compat import diffusers_cp
from diffpar.testing import tiny_transformers


def uneven_gather_without_and_with_shim():
    """diffusers' `_all_gather_anything` gathers different sizes with dist.all_gather: gloo refuses."""
    from diffusers.hooks import context_parallel as hcp

    rank = dist.get_rank()
    local = torch.arange(rank + 2, dtype=torch.float32).reshape(1, rank + 2) + 10 * rank
    expected = torch.cat([torch.arange(r + 2, dtype=torch.float32).reshape(1, r + 2) + 10 * r
                          for r in range(dist.get_world_size())], dim=1)
    try:
        hcp._all_gather_anything(local, 1, dist.group.WORLD)
        without = "ok"
    except Exception as exc:  # gloo: different sizes per rank
        without = f"{type(exc).__name__}: {exc}"
    diffusers_cp.SHARED_SHIMS.acquire()
    try:
        with_shim = hcp._all_gather_anything(local, 1, dist.group.WORLD)
    finally:
        diffusers_cp.SHARED_SHIMS.release()
    return {"without": without, "equal_with_shim": torch.equal(with_shim, expected)}


def ulysses_anything_mask_without_mask_shim():
    """Padded mask + uneven Ulysses-anything split at world 4, with only the mask shim removed."""
    model, make_inputs = tiny_transformers.build("qwenimage", heads=4)
    inputs = make_inputs(seq=13, text=7, text_padding=3)
    with torch.no_grad():
        reference = copy.deepcopy(model)(**copy.deepcopy(inputs))[0]
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(
        ulysses_size=4, ulysses_anything=True))
    try:
        with torch.no_grad():
            with_shim = model(**copy.deepcopy(inputs))[0]
    except BaseException:
        handle.detach()  # e.g. the padded-prompt refusal on 0.37.x/0.38: leave nothing installed
        raise
    patch = next(p for p in diffusers_cp.SHARED_SHIMS._patches if p.name == "_templated_context_parallel_attention")
    patch.undo()
    try:
        with torch.no_grad():
            without = model(**copy.deepcopy(inputs))[0]
    finally:
        diffusers_cp.SHARED_SHIMS._patches.remove(patch)
        handle.detach()
    return {"with": (with_shim - reference).abs().max().item(), "without": (without - reference).abs().max().item()}


def enable_parallelism_on_cpu():
    """diffusers' own entry point on a CPU-only machine (what diffpar avoids calling)."""
    from diffusers import ContextParallelConfig

    model, _ = tiny_transformers.build("flux")
    try:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()))
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
