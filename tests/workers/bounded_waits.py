"""Rank-side: waits inside a parallel call, on the sub-groups diffpar's mesh creates, end after `timeout_s`."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_transformers
from diffpar.testing.probes import SplitProbe


class SimulatedFailure(RuntimeError):
    """What a rank raises in the middle of a call (an out-of-memory error, a bug in a callback)."""


def subgroup_wait_times_out(timeout_s: float, mode: str) -> dict:
    """Ulysses 2 at world 4 (dp 2: ranks {0, 1} and {2, 3} each run a copy). Rank 1 stops in the middle of the
    call: `mode="raises"` raises in its first transformer block, after the call was agreed; `mode="skips"` (no
    per-call agreement) never calls the model; `mode="skips_agreed"` never calls it either, but the call is agreed
    (so the others wait in the agreement, on the whole world). Rank 0 then waits in diffusers' Ulysses all-to-all on its
    sub-group until `timeout_s`; ranks 2 and 3 finish their call. Every rank returns what happened to it (none
    raises, so the test sees every rank's error); the test replaces these processes afterwards."""
    model, make_inputs = tiny_transformers.build("flux")
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(
        ulysses_size=2, timeout_s=timeout_s, check_every_call=(mode != "skips")))
    inputs = make_inputs(seq=16, text=8)
    rank = dist.get_rank()
    if rank == 1 and mode == "raises":
        def fail(module, args):
            raise SimulatedFailure("rank 1 failed in the middle of the call (simulated)")

        model.transformer_blocks[0].register_forward_pre_hook(fail)
    result = {"rank": rank, "error": None, "message": "", "seconds": 0.0, "split": None}
    try:
        if rank == 1 and mode in ("skips", "skips_agreed"):
            result["skipped"] = True
            return result
        started = time.monotonic()
        with SplitProbe(model) as probe:
            try:
                with torch.no_grad():
                    model(**inputs)
            except Exception as exc:  # noqa: BLE001 (reported to the test, which asserts on it)
                result.update(error=type(exc).__name__, message=str(exc))
        result["seconds"] = time.monotonic() - started
        result["split"] = probe.summary()
        return result
    finally:
        handle.detach()


def one_rank_without_parallelism(timeout_s: float) -> dict:
    """Rank 1 calls `enable_cache` with `parallelism_config=None` (no parallelism: nothing to agree); rank 0 asks
    for Ulysses 2 and must fail after `timeout_s` saying that not every rank joined, instead of blocking."""
    model, _ = tiny_transformers.build("flux")
    config = None if dist.get_rank() == 1 else diffpar.ParallelismConfig(ulysses_size=2, timeout_s=timeout_s)
    result = {"rank": dist.get_rank(), "error": None, "message": ""}
    started = time.monotonic()
    try:
        handle = diffpar.enable_cache(model, parallelism_config=config)
        handle.detach()
    except Exception as exc:  # noqa: BLE001 (reported to the test)
        result.update(error=type(exc).__name__, message=str(exc))
    result["seconds"] = time.monotonic() - started
    return result
