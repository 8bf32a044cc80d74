"""The process group and the named device meshes, built once.

`ensure_process_group()` starts torch.distributed from torchrun's environment when nobody did (NCCL for CUDA
tensors, gloo for CPU ones). `ParallelDims` checks degrees against the world once; `ParallelDims.build()`
returns the 4-D mesh ("dp" or "cfg", "ring", "ulysses", "tp"), cached so two models sharing a layout share groups.
A "dp" dimension larger than 1 means the model degrees do not use the whole world: each dp group runs its
own full copy of the transformer, while extra modules still use the whole world.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import traceback
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffpar.errors import DiffparError, RankMismatchError

logger = logging.getLogger("diffpar")

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_MESH_CACHE: dict = {}


def torchrun_env_present() -> bool:
    return all(k in os.environ for k in _TORCHRUN_ENV)


def ensure_process_group(timeout_s: float | None = None) -> bool:
    """Initialize torch.distributed from torchrun's environment if needed. Returns whether one exists.

    The group carries `timeout_s` (every collective on it, and the start-up rendezvous, waits at most that
    long); when the peers named by torchrun's variables never arrive, a clear error names the variables."""
    if dist.is_available() and dist.is_initialized():
        return True
    if not dist.is_available() or not torchrun_env_present():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # gloo carries the small CPU-side collectives (size exchanges, agreement checks).
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    try:
        dist.init_process_group(backend=backend, **kwargs)
    except (RuntimeError, ValueError) as exc:  # DistStoreError / DistNetworkError are RuntimeErrors
        env = ", ".join(f"{k}={os.environ.get(k)}" for k in (*_TORCHRUN_ENV, "LOCAL_RANK"))
        raise DiffparError(
            f"diffpar could not start torch.distributed from the environment ({env}): the other ranks did not "
            f"join{f' within {timeout_s:.0f} s' if timeout_s else ''}. Launch every rank with torchrun "
            "(`torchrun --nproc_per_node=N script.py`), or unset these variables to run in one process "
            f"(they may be left over from another launch). ({type(exc).__name__}: {str(exc)[:300]})"
        ) from None
    return True


def end_process(code: int = 0, timeout_s: float = 60.0):
    """Leave a torchrun rank with `code` and nothing else: wait (bounded) until every rank got here, flush, and
    `os._exit`. For diffpar's own programs (the demo, the generate command): C++ teardown of the process group and
    its threads at interpreter exit sometimes aborts ("terminate called without an active exception", SIGABRT,
    about 1 run in 5 on 2 CPU ranks), turning a correct run into a failed one; skipping that teardown avoids it
    and the operating system frees everything anyway."""
    if dist.is_available() and dist.is_initialized():
        try:
            work = dist.barrier(async_op=True)
            work.wait(timeout=timedelta(seconds=timeout_s))
        except Exception:  # noqa: BLE001 (a peer that died already: exit with our own code regardless)
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def current_device() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_type_for_collectives() -> str:
    return current_device().type


@dataclass(frozen=True)
class ParallelDims:
    """The degrees, checked against the world once. The outermost dimension is "cfg" when `cfg` > 1 (the two
    guidance branches: one exchange of the prediction per step, the least traffic of all dimensions, so across
    nodes in a multi-node launch), else "dp" (the ranks the model degrees leave over)."""

    world_size: int
    ulysses: int = 1
    ring: int = 1
    tp: int = 1
    cfg: int = 1

    def __post_init__(self):
        model = self.ulysses * self.ring * self.tp
        if model > self.world_size or self.world_size % model != 0:
            raise DiffparError(
                f"ulysses_size={self.ulysses} x ring_size={self.ring} x tp_size={self.tp} = {model} does not fit a "
                f"world of {self.world_size} processes: the product must divide the world size. Launch "
                f"`torchrun --nproc_per_node={model}` or choose degrees whose product divides {self.world_size}."
            )
        if self.cfg > 1 and self.cfg * model != self.world_size:
            raise DiffparError(
                f"cfg_size={self.cfg} x ulysses_size={self.ulysses} x ring_size={self.ring} x tp_size={self.tp} = "
                f"{self.cfg * model} ranks, but the world has {self.world_size}: with cfg_size, the degrees must "
                f"use every rank. Launch `torchrun --nproc_per_node={self.cfg * model}`, or raise ulysses_size / "
                f"ring_size / tp_size so that cfg_size x their product = {self.world_size}."
            )

    @property
    def dp(self) -> int:
        """Size of the outermost dimension: the cfg groups, or the dp groups."""
        return self.world_size // (self.ulysses * self.ring * self.tp)

    @property
    def outer_name(self) -> str:
        return "cfg" if self.cfg > 1 else "dp"

    @property
    def cp(self) -> int:
        return self.ulysses * self.ring

    def build(self):
        """The (outer, "ring", "ulysses", "tp") mesh, outer being "cfg" or "dp"; every rank must call this (it
        creates process groups)."""
        from torch.distributed.device_mesh import init_device_mesh

        key = (device_type_for_collectives(), self.outer_name, self.dp, self.ring, self.ulysses, self.tp)
        mesh = _MESH_CACHE.get(key)
        if mesh is None:
            mesh = init_device_mesh(
                key[0], (self.dp, self.ring, self.ulysses, self.tp),
                mesh_dim_names=(self.outer_name, "ring", "ulysses", "tp"),
            )
            _MESH_CACHE[key] = mesh
        return mesh


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _wait(work, what: str, timeout_s: float | None) -> None:
    if timeout_s is None:
        work.wait()
        return
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise DiffparError(
            f"{what}: waited {timeout_s:.0f} s for the other ranks and not every rank arrived (a rank that raised "
            "earlier, skipped this call, or runs a different script). Every rank must make the same calls; "
            f"ParallelismConfig(timeout_s=...) sets how long to wait. ({exc})"
        ) from None


def _exchange_json(payload: dict, group=None, what: str = "diffpar", timeout_s: float | None = None) -> list[dict]:
    """All-gather one JSON document per rank as uint8 tensors (never pickles: a peer's bytes are only parsed as
    JSON). Two collectives, the sizes then the padded bytes, each wait bounded by `timeout_s`."""
    data = json.dumps(payload, sort_keys=True, default=repr).encode()
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    _wait(dist.all_gather(sizes, size, group=group, async_op=True), what, timeout_s)
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    _wait(dist.all_gather(bufs, buf, group=group, async_op=True), what, timeout_s)
    return [json.loads(bytes(b[: int(n.item())].tolist()).decode()) for b, n in zip(bufs, sizes)]


def _leaves(value, prefix: str = "") -> dict:
    """Nested dicts flattened to {"a.b.c": leaf}, so a mismatch names the exact field."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def differing_fields(reference: dict, other: dict) -> list[tuple[str, object, object]]:
    a, b = _leaves(reference), _leaves(other)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def agree(what: str, description: dict, local_error: BaseException | None = None, group=None, *,
          failed: str = "failed its checks", timeout_s: float | None = None) -> None:
    """One collective exchange that every rank enters, even a rank whose local checks failed.

    Every rank sends a fingerprint of its description and whether it failed (one all-gather of 3 integers); only
    when something differs do they exchange the descriptions and errors themselves, as JSON, to say what. Then
    every rank raises the same error, so a mistake found on one rank never leaves the others waiting in a later
    collective. A mismatch names only the fields that differ, with each rank's value.
    """
    if not dist.is_initialized():
        if local_error is not None:
            raise local_error
        return
    fp = fingerprint(description)
    # Round 1, one all-gather of 3 integers: did anyone fail, and does everyone's fingerprint match? The common
    # case ends here. Every rank sees the same gathered values, so every rank takes the same branch below.
    mine = torch.tensor([int(local_error is not None), int(fp[:8], 16), int(fp[8:16], 16)], dtype=torch.int64)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    _wait(dist.all_gather(everyone, mine, group=group, async_op=True), what, timeout_s)
    if all(int(e[0]) == 0 and torch.equal(e[1:], mine[1:]) for e in everyone):
        return
    # Round 2, only to explain: every rank's description and error, as JSON.
    payload = {
        "fp": fp,
        "desc": description,
        "error": None
        if local_error is None
        else [type(local_error).__name__, str(local_error), "".join(traceback.format_exception(local_error))],
    }
    gathered = _exchange_json(payload, group, what, timeout_s)
    errors = [(r, p["error"]) for r, p in enumerate(gathered) if p["error"] is not None]
    if errors:
        if local_error is not None:
            raise local_error
        r, (name, msg, _) = errors[0]
        raise DiffparError(f"{what}: rank {r} {failed} ({name}): {msg}")
    if len({p["fp"] for p in gathered}) > 1:
        diffs = []
        for r, p in enumerate(gathered):
            if p["fp"] != gathered[0]["fp"]:
                fields = differing_fields(gathered[0]["desc"], p["desc"])
                shown = "; ".join(f"{k}: rank 0 {a!r}, rank {r} {b!r}" for k, a, b in fields[:8])
                more = f" (and {len(fields) - 8} more)" if len(fields) > 8 else ""
                diffs.append(f"rank {r} differs from rank 0 in {[k for k, _, _ in fields]}: {shown}{more}")
        hint = ""
        if any("weights" in d for d in diffs):
            hint = (" Weights differ between ranks: load the same checkpoint on every rank, and change weights "
                    "(LoRAs, adapter scales) on every rank alike.")
        raise RankMismatchError(
            f"{what}: ranks were given different configurations, so their collectives would not match (a hang "
            f"or a wrong image). {'; '.join(diffs)}. Every rank must run the same script with the same "
            f"arguments.{hint}"
        )
