"""The calls a diffusers user adds: `parallelize` / `enable_cache`, `disable_cache`, and `plan` for a dry run.

Every one is plan -> agree -> apply(plan) -> handle:
1. Bootstrap: start torch.distributed from torchrun's environment if nobody did.
2. Plan (`diffpar.plan`): every local check, on every rank, no collective, no change to any module.
3. Agree: one collective every rank enters, even a rank whose plan failed; it carries each rank's error and
   `plan.describe()`. Every rank then raises the same error, or `RankMismatchError` naming what differs.
4. Apply (`applying.apply_plan`): the agreed plan, each step's undo recorded first; a failure on any rank rolls
   back every rank.
"""
from __future__ import annotations

import warnings

import torch.distributed as dist

from diffpar import mesh as mesh_lib
from diffpar.applying import apply_plan
from diffpar.config import ParallelismConfig
from diffpar.errors import DiffparError
from diffpar.handle import ParallelHandle
from diffpar.logs import quiet_other_ranks
from diffpar.planning import plan


def parallelize(target, parallelism_config: ParallelismConfig | None = None, *, cache_config=None) -> ParallelHandle:
    """Spread `target` (a diffusers pipeline or a model) over the processes torchrun started, in place.

    Every rank must make the same call. Returns a handle; `handle.detach()` or `disable_cache(target)` undoes
    everything, and `handle.plan` is what was applied.
    """
    return enable_cache(target, cache_config=cache_config, parallelism_config=parallelism_config)


def enable_cache(target, cache_config=None, parallelism_config: ParallelismConfig | None = None) -> ParallelHandle:
    """Parallelize (and, with `cache_config`, cache) a diffusers pipeline or model in place.

    The seed's entry point, kept for cache-dit users; `parallelize` is the same call. Every rank launched by
    torchrun must make the same call.
    """
    existing = getattr(target, "_diffpar_handle", None)
    if existing is not None and not existing.detached:
        raise DiffparError(
            f"diffpar is already enabled on this {type(target).__name__}. Call diffpar.disable_cache(...) first; "
            "applying twice would stack hooks."
        )
    if parallelism_config is not None and not isinstance(parallelism_config, ParallelismConfig):
        raise DiffparError(
            f"parallelism_config must be a diffpar.ParallelismConfig, got {type(parallelism_config).__name__}."
        )
    multi_rank = False
    if parallelism_config is not None:
        multi_rank = mesh_lib.ensure_process_group(parallelism_config.timeout_s) and dist.get_world_size() > 1
        if not multi_rank:
            warnings.warn(
                "diffpar: one process only (no torchrun environment, or a world of 1): parallelism is a no-op. "
                "Launch with `torchrun --nproc_per_node=N script.py` to use N processes.",
                stacklevel=3,
            )

    local_error, the_plan = None, None
    try:
        if parallelism_config is not None and not multi_rank:
            # One process: nothing to split, but the config is still checked against the model, as a launch on
            # the smallest world it fits would check it, so a mistake shows before the expensive multi-GPU run.
            plan(target, None, parallelism_config, world_size=parallelism_config.model_degree)  # cache: below
        the_plan = plan(target, cache_config, parallelism_config if multi_rank else None,
                        world_size=None if multi_rank else 1)
    except Exception as exc:  # whatever failed here, every rank must still reach the agreement below
        local_error = exc
    if multi_rank:
        mesh_lib.agree("diffpar.enable_cache", the_plan.describe() if the_plan is not None else {}, local_error,
                       timeout_s=parallelism_config.timeout_s)
    elif local_error is not None:
        raise local_error

    handle = ParallelHandle(target=target, config=parallelism_config, plan=the_plan)
    try:
        if multi_rank:
            quiet_other_ranks(target, handle)  # progress bars and warnings on rank 0 only
        apply_plan(target, the_plan, parallelism_config, handle)
    except BaseException:
        handle.detach(strict=False)
        raise
    handle.commit()
    target._diffpar_handle = handle
    return handle


def disable_cache(target) -> list[str]:
    handle = getattr(target, "_diffpar_handle", None)
    if handle is None:
        raise DiffparError(f"diffpar is not enabled on this {type(target).__name__}; nothing to disable.")
    return handle.detach()
