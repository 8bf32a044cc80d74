"""The process group and the named device meshes, built once.

`ensure_process_group()` starts torch.distributed from torchrun's environment when nobody did (NCCL for CUDA
tensors, gloo for CPU ones). `ParallelDims` checks degrees against the world once; `ParallelDims.build()`
returns the 4-D mesh ("dp" or "cfg", "ring", "ulysses", "tp"), cached so two models sharing a layout share groups.
A "dp" dimension larger than 1 means the model degrees do not use the whole world: each dp group runs its
own full copy of the transformer, while extra modules still use the whole world.
"""
from __future__ import annotations

import atexit
import ctypes
import gc
import hashlib
import json
import logging
import os
import struct
import sys
import traceback
import types
import weakref
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffpar.errors import DiffparError, RankMismatchError

logger = logging.getLogger("diffpar")

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_MESH_CACHE: dict = {}
# The `timeout_s` of the enable_cache call in progress (set by `ensure_process_group`): the groups a mesh creates
# carry it when `ParallelDims.build` is not given one.
_GROUP_TIMEOUT_S: list = [None]
# Whole-world groups that carry a timeout, by timeout_s (the default group itself when diffpar started it with
# that timeout). A wait on one ends by the group's own timeout, so nothing stays pending after it fires.
_WORLD_GROUPS: dict = {}


def world_group_backend(default_backend: str) -> dict:
    """The backend of diffpar's whole-world group when the caller started torch.distributed: the default group's,
    except that one with no CPU backend (`init_process_group("nccl")`) gets gloo beside NCCL. diffpar's small
    exchanges (the agreement's rows, sizes) are CPU tensors, which NCCL does not carry; GPU tensors still go over
    NCCL (the same mapping diffpar uses when it starts the group itself)."""
    if "nccl" in default_backend and "gloo" not in default_backend:
        return {"backend": "cpu:gloo,cuda:nccl"}
    return {}


def torchrun_env_present() -> bool:
    return all(k in os.environ for k in _TORCHRUN_ENV)


def ensure_process_group(timeout_s: float | None = None) -> bool:
    """Initialize torch.distributed from torchrun's environment if needed. Returns whether one exists.

    The group carries `timeout_s` (every collective on it, and the start-up rendezvous, waits at most that
    long); when the peers named by torchrun's variables never arrive, a clear error names the variables. The
    sub-groups `ParallelDims.build` creates later carry the same timeout, also when the caller started the group.

    When the caller started torch.distributed, its default group carries the caller's timeout (torch's default
    is 30 minutes), so a whole-world group carrying `timeout_s` is made here, once per timeout (a collective:
    every rank calls this at the same point, at the start of `enable_cache`); `agree` waits on it."""
    _GROUP_TIMEOUT_S[0] = timeout_s
    if dist.is_available() and dist.is_initialized():
        if timeout_s is not None and timeout_s not in _WORLD_GROUPS and dist.get_world_size() > 1:
            try:
                _WORLD_GROUPS[timeout_s] = dist.new_group(timeout=timedelta(seconds=timeout_s),
                                                          **world_group_backend(str(dist.get_backend())))
            except RuntimeError as exc:  # gloo's "Wait timeout": a peer never came to make the group
                raise DiffparError(
                    f"diffpar.enable_cache: not every rank came to set up diffpar's process group within "
                    f"{timeout_s:g} s (a rank that did not call enable_cache, called it with "
                    "parallelism_config=None, or failed before it). Every rank must make the same enable_cache "
                    f"call; ParallelismConfig(timeout_s=...) sets how long to wait. ({type(exc).__name__}: {exc})"
                ) from None
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
    if timeout_s is not None:
        _WORLD_GROUPS[timeout_s] = dist.group.WORLD
    atexit.register(release_process_groups)
    return True


# Every handle that applied a multi-rank plan in this process, while it lives (weak: a handle the user dropped is
# not kept alive by this). At exit, `release_process_groups` drops their engines' state before freeing the groups.
# By id: a handle is a dataclass compared by value, so not hashable.
_LIVE_HANDLES: dict[int, weakref.ref] = {}


def track_handle(handle) -> None:
    """Remember `handle` (weakly) so that the exit handler can drop what its engines hold (`handle.states`)."""
    key = id(handle)
    _LIVE_HANDLES[key] = weakref.ref(handle, lambda _: _LIVE_HANDLES.pop(key, None))


def release_process_groups() -> None:
    """Free torch.distributed's groups, and end their gloo threads, while the interpreter is whole: registered with
    `atexit` only when diffpar started the default group (`ensure_process_group`). A default group the user
    started is the user's to destroy: this is never registered then, and nothing of theirs is touched. Not a
    collective; the other ranks do the same at their exit. Every collective diffpar waits on carries `timeout_s`,
    so none is left pending to block this.

    `destroy_process_group` only unregisters the groups: a gloo group's worker and transport threads end only when
    its last reference goes, and an enabled pipeline still references its groups (device meshes in diffusers'
    hooks, sharded layers, the VAE split's state, hook closures). Left alone they live into interpreter
    finalization, where C++ teardown of still-running threads can abort ("terminate called without an active
    exception", issue 10). So, in order:
    1. the meshes diffpar built forget their groups (a DeviceMesh keeps them in a plain dict; diffusers' hooks keep
       the mesh), which frees every sub-group;
    2. every live handle drops its engines' runtime state (`handle.states`: the VAE split's state, the call
       checker, the mesh);
    3. the default group is destroyed, then whatever still references it (the Python object held by sharded
       layers' `group` attribute and by hook closures of a pipeline the script never detached) is cut, so the
       group's last reference goes here and its threads are joined. The process is exiting: the pipeline could
       not run without its group anyway.
    Measured (2 CPU ranks, tests/test_bounded_waits.py): 18 gloo threads alive at exit before step 1, 3 after it
    (the default group's), 0 after steps 2-3."""
    for mesh in _MESH_CACHE.values():
        registry = getattr(mesh, "_pg_registry", None)  # shared by the mesh's sub-meshes and flattened meshes
        if isinstance(registry, dict):
            registry.clear()
    _MESH_CACHE.clear()
    _WORLD_GROUPS.clear()
    for ref in list(_LIVE_HANDLES.values()):
        handle = ref()
        if handle is not None:
            handle.states.clear()
    _LIVE_HANDLES.clear()
    if not (dist.is_available() and dist.is_initialized()):
        return
    default_group = dist.group.WORLD
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 (exiting anyway; a broken group must not turn a success into a failure)
        return
    _cut_references(default_group)  # the group's last reference goes: its threads are joined here
    del default_group


def _cut_references(obj) -> None:
    """Replace every reference to `obj` held as an object's attribute, in a list or in a closure cell by None.
    Only for the exit handler above: the objects holding `obj` are never used again. Compared by id, and a dict
    only when it is some object's `__dict__`: a frame's locals snapshot may be written back to the frame (this
    one's included)."""
    target = id(obj)
    # No gc.collect() (0.9 s with torch and diffusers loaded): a holder in an unreachable cycle is found and cut
    # like any other, so the group's count still drops to zero here.
    holders = gc.get_referrers(obj)
    del obj
    dicts = [h for h in holders if isinstance(h, dict)]
    # One scan of the heap for the owners of every dict holder (not one per dict).
    attribute_dicts = {id(_attributes(o)) for o in gc.get_referrers(*dicts)} if dicts else set()
    for holder in holders:
        if isinstance(holder, types.CellType):
            if id(holder.cell_contents) == target:
                holder.cell_contents = None
        elif isinstance(holder, list):
            for i, v in enumerate(holder):
                if id(v) == target:
                    holder[i] = None
        elif isinstance(holder, dict):
            if id(holder) in attribute_dicts:
                _cut_attributes(holder, target)
        elif not isinstance(holder, (tuple, types.FrameType)):
            attributes = _attributes(holder)  # an object with its attributes inline (3.11+)
            if attributes is not None:
                _cut_attributes(attributes, target)
    holders.clear()
    dicts.clear()


def _attributes(obj) -> dict | None:
    try:
        attributes = object.__getattribute__(obj, "__dict__")
    except Exception:  # noqa: BLE001 (no attributes, or a descriptor that raises: not a holder to cut)
        return None
    return attributes if isinstance(attributes, dict) else None


def _cut_attributes(attributes: dict, target: int) -> None:
    for key in [k for k, v in attributes.items() if id(v) == target]:
        attributes[key] = None


def world_group(timeout_s: float | None = None):
    """The whole world as a group whose collectives end after `timeout_s` by themselves (made by
    `ensure_process_group`); the default group when there is none for that timeout."""
    return _WORLD_GROUPS.get(timeout_s, dist.group.WORLD)


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

    def build(self, timeout_s: float | None = None):
        """The (outer, "ring", "ulysses", "tp") mesh, outer being "cfg" or "dp"; every rank must call this (it
        creates process groups).

        Every group of the mesh carries `timeout_s` (default: the one given to `ensure_process_group`), so a wait
        inside diffusers' Ulysses all-to-all, a ring exchange or a TP all-reduce on a sub-group fails after it
        instead of torch's default (30 min for gloo). That includes the flattened meshes made later with
        `_flatten()` (diffusers' "ring_ulysses", diffpar's "ring_ulysses_tp"): they are made here, with the
        timeout, and `_flatten()` returns them."""
        from torch.distributed.device_mesh import init_device_mesh

        if timeout_s is None:
            timeout_s = _GROUP_TIMEOUT_S[0]
        key = (device_type_for_collectives(), self.outer_name, self.dp, self.ring, self.ulysses, self.tp, timeout_s)
        mesh = _MESH_CACHE.get(key)
        if mesh is None:
            names = (self.outer_name, "ring", "ulysses", "tp")
            override = None if timeout_s is None else {n: group_options(timeout_s) for n in names}
            mesh = init_device_mesh(key[0], (self.dp, self.ring, self.ulysses, self.tp), mesh_dim_names=names,
                                    backend_override=override)
            if timeout_s is not None:
                if self.cp > 1:
                    mesh["ring", "ulysses"]._flatten(backend_override=group_options(timeout_s))
                if self.dp > 1:
                    mesh["ring", "ulysses", "tp"]._flatten(backend_override=group_options(timeout_s))
            _MESH_CACHE[key] = mesh
        return mesh


def group_options(timeout_s: float) -> tuple:
    """A DeviceMesh `backend_override` entry that gives a new group `timeout_s` (torch takes a group's timeout
    from its options; without them a new group gets torch's default, not the default group's). One fresh options
    object per call: NCCL writes each group's name into the options it is given."""
    timeout = timedelta(seconds=timeout_s)
    if "nccl" in str(dist.get_backend()) and dist.is_nccl_available():
        options = dist.ProcessGroupNCCL.Options()
    else:  # gloo reads only the timeout
        options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    return (None, options)  # backend None: the default group's ("gloo", or "cpu:gloo,cuda:nccl")


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=repr).encode()).hexdigest()[:16]


def _wait(work, what: str, timeout_s: float | None, group_carries_timeout: bool = False) -> None:
    """Wait for `work`, at most `timeout_s`. On a group that carries the timeout the collective ends by itself
    when it fires (nothing stays pending: the process can exit); on another group (one the caller made, with
    its own timeout) the wait is polled, and the collective stays pending until that group's timeout."""
    if timeout_s is None:
        work.wait()
        return
    try:
        if group_carries_timeout:
            work.wait()
        else:
            work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise DiffparError(
            f"{what}: waited {timeout_s:.0f} s for the other ranks and not every rank arrived (a rank that raised "
            "earlier, skipped this call, or runs a different script). Every rank must make the same calls; "
            f"ParallelismConfig(timeout_s=...) sets how long to wait. ({exc})"
        ) from None


def _exchange_json(payload: dict, group=None, what: str = "diffpar", timeout_s: float | None = None,
                   group_carries_timeout: bool = False) -> list[dict]:
    """All-gather one JSON document per rank as uint8 tensors (never pickles: a peer's bytes are only parsed as
    JSON). Two collectives, the sizes then the padded bytes, each wait bounded by `timeout_s`."""
    data = json.dumps(payload, sort_keys=True, default=repr).encode()
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    _wait(dist.all_gather(sizes, size, group=group, async_op=True), what, timeout_s, group_carries_timeout)
    longest = max(int(s.item()) for s in sizes)
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    _wait(dist.all_gather(bufs, buf, group=group, async_op=True), what, timeout_s, group_carries_timeout)
    return [json.loads(bytes(b[: int(n.item())].tolist()).decode()) for b, n in zip(bufs, sizes)]


def gather_json(payload: dict, group=None, timeout_s: float | None = None, what: str = "diffpar") -> list[dict]:
    """Every rank's `payload` (JSON-able), in rank order: for reports a program prints on rank 0. JSON in uint8
    tensors, never pickles; waits bounded by `timeout_s`."""
    return _exchange_json(payload, group, what, timeout_s)


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


class AgreementBuffers:
    """An agreement's row and gathered rows, for a caller that agrees again and again on one group with rows of one
    width (the per-call agreement: one exchange per pipeline call). One `bytearray` under the tensor gloo sends,
    written with `struct` and `ctypes.memmove`, read with memoryviews: with the caches cold at a call's start, each
    numpy or torch operation there cost 5-15 us, a struct, memoryview or ctypes one 1-5 us (measured on 2 gloo CPU
    ranks). Used by one exchange at a time: while one is in flight (its settle never came, e.g. an interrupted
    call), the next exchange gets buffers of its own.

    `rank` given: the table is gathered by summing (an all-reduce): this rank's row is written into its own slot of
    `rows`, every other slot zero, so the sum is every rank's row in rank order, exactly (integers; the payload's
    bytes too, as the int64 words holding them). `payload_bytes`: room after each row's integers for bytes the
    caller sends beside them (the per-call agreement: the random states themselves), read back with `payloads`."""

    def __init__(self, world: int, width: int, rank: int | None = None, payload_bytes: int = 0):
        self.world, self.width, self.rank, self.payload_bytes = world, width, rank, payload_bytes
        self.stride = 8 * width + -(-payload_bytes // 8) * 8  # bytes per row: whole int64 words
        self.header = struct.Struct(f"={width}q")  # native int64s, as the tensor holds them
        self.memory = bytearray(world * self.stride)
        self.rows = torch.frombuffer(self.memory, dtype=torch.int64)  # flat: gloo wants it so
        if rank is None:  # gathered: this rank's row in a buffer of its own
            self.row_memory, self.offset = bytearray(self.stride), 0
            self.row = torch.frombuffer(self.row_memory, dtype=torch.int64)
        else:
            self.row_memory, self.offset, self.row = self.memory, rank * self.stride, None
        self._zeros = bytes(len(self.row_memory))
        self._row_address = (self.rows if self.row is None else self.row).data_ptr() + self.offset
        self.busy = False

    def take(self, group, width: int, payload_bytes: int = 0) -> "AgreementBuffers":
        if self.busy or width != self.width or payload_bytes != self.payload_bytes:
            rank = None if self.rank is None else dist.get_rank(group)
            return AgreementBuffers(dist.get_world_size(group), width, rank, payload_bytes).take(
                group, width, payload_bytes)
        self.busy = True
        return self

    def write(self, values: tuple, parts=()) -> None:
        """This rank's row: `values` (int64s), then `parts` (uint8 tensors, `payload_bytes` at most in all) one after
        the other, the rest zero (and every other rank's slot, when summed)."""
        if sum(part.nbytes for part in parts) > self.payload_bytes:
            raise ValueError(f"diffpar: {sum(p.nbytes for p in parts)} payload bytes do not fit the agreement's "
                             f"room of {self.payload_bytes}")
        memory, offset = self.row_memory, self.offset
        memoryview(memory)[:] = self._zeros
        self.header.pack_into(memory, offset, *values)
        at = self._row_address + 8 * self.width
        for part in parts:  # copied from the tensor's memory: 12 us less than through numpy views, cold
            if not (part.is_cpu and part.dtype == torch.uint8 and part.is_contiguous()):
                part = part.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # its bytes, as they are
            ctypes.memmove(at, part.data_ptr(), part.nbytes)
            at += part.nbytes

    def rows_identical(self) -> bool:
        """Whether every rank's row is rank 0's, byte for byte (one memcmp a rank: the common case's whole check)."""
        memory, stride = self.memory, self.stride
        view = memoryview(memory)
        # `startswith` compares a rank's row with the start of the table (rank 0's row) in place, no copies
        return all(memory.startswith(view[r * stride:(r + 1) * stride]) for r in range(1, self.world))

    def header_of(self, rank: int) -> tuple[int, ...]:
        return self.header.unpack_from(self.memory, rank * self.stride)

    def header_table(self) -> list[tuple[int, ...]]:
        """Every rank's integers (the payloads left out), after the exchange."""
        unpack, memory, stride = self.header.unpack_from, self.memory, self.stride
        return [unpack(memory, r * stride) for r in range(self.world)]

    def payloads(self) -> list[memoryview]:
        """Every rank's payload bytes, in rank order (views, valid until the next exchange)."""
        view, start = memoryview(self.memory), 8 * self.width
        return [view[r * self.stride + start:r * self.stride + start + self.payload_bytes] for r in range(self.world)]

    def release(self) -> None:
        self.busy = False


class PendingAgreement:
    """Round 1 of an `agree` exchange, in flight: `settle()` waits for it (bounded), explains a mismatch or a
    failed rank (round 2), and returns every rank's `values`. Issued early and settled late, the round trip
    overlaps the caller's own local work (the per-call agreement: the pipeline's tokenizing and text encoding)."""

    def __init__(self, what: str, description: dict, local_error, group, failed: str, timeout_s, values,
                 fp: str | None = None, buffers: AgreementBuffers | None = None, issue_sum=None,
                 payload=None, payload_bytes: int = 0):
        self.what, self.description, self.local_error = what, description, local_error
        self.failed, self.timeout_s = failed, timeout_s
        self.identical = False  # settled: every rank's row was the same, byte for byte (payloads equal too)
        self.carries = False
        if not dist.is_initialized():  # one process: nothing to exchange, settle() answers alone
            self.values, self.work, self.buffers = tuple(values), None, None
            self.payload = payload
            return
        if group is None and timeout_s is not None and timeout_s in _WORLD_GROUPS:
            group, self.carries = _WORLD_GROUPS[timeout_s], True  # the whole world; its collectives end by themselves
        self.group = group
        self.fp = fp if fp is not None else fingerprint(description)
        # Round 1, one all-gather of [failed, h, *values, payload], h = 62 bits of the fingerprint (or the same table
        # by a sum all-reduce). The common case ends here.
        self.width = 2 + len(values)
        # Every rank's row has the same width, whether it sends a payload or not (gloo aborts on unequal sizes).
        if buffers is None:
            buffers = AgreementBuffers(dist.get_world_size(group), self.width,
                                       None if issue_sum is None else dist.get_rank(group), payload_bytes)
        self.buffers = buffers.take(group, self.width, payload_bytes)
        self.buffers.write((int(local_error is not None), int(self.fp, 16) >> 2, *values), payload or ())
        if issue_sum is not None:
            self.work = issue_sum(self.buffers.rows, group)
        else:
            self.work = _issue_all_gather(self.buffers.rows, self.buffers.row, group)

    def settle(self) -> list[tuple[int, ...]]:
        if self.work is None:
            if self.local_error is not None:
                raise self.local_error
            return [self.values]
        _wait(self.work, self.what, self.timeout_s, self.carries)
        # Every rank sees the same table, so every rank takes the same branch.
        if self.buffers.rows_identical():  # the common case: every rank sent the same row, payload and all
            header = self.buffers.header_of(0)
            self.buffers.release()
            if not header[0]:
                self.identical = True
                return [header[2:]] * self.buffers.world
        table = self.buffers.header_table()
        self.buffers.release()
        if not any(r[0] for r in table) and len({r[1] for r in table}) == 1:
            return [tuple(r[2:]) for r in table]
        _explain(self.what, self.description, self.fp, self.local_error, self.group, self.failed, self.timeout_s,
                 self.carries)
        return [tuple(r[2:]) for r in table]  # not reached: _explain raises on every rank

    def arrived(self) -> bool:
        """Whether every rank's row is in (settling would not wait)."""
        return self.work is None or self.work.is_completed()

    def payloads(self):
        """After `settle()`: every rank's payload bytes, in rank order (memoryviews, valid until the next exchange
        on the same buffers)."""
        if self.buffers is None:
            return [memoryview(b"".join(p.numpy().tobytes() for p in self.payload or ()))]
        return self.buffers.payloads()


def agree(what: str, description: dict, local_error: BaseException | None = None, group=None, *,
          failed: str = "failed its checks", timeout_s: float | None = None,
          values: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """One collective exchange that every rank enters, even a rank whose local checks failed.

    Every rank sends whether it failed, a fingerprint of its description and `values` (a few more integers the
    caller needs from every rank in the same round trip) in one all-gather of a few integers; only when a rank failed or the fingerprints differ do they exchange the descriptions and errors
    themselves, as JSON, to say what. Then every rank raises the same error, so a mistake found on one rank never
    leaves the others waiting in a later collective. A mismatch names only the fields that differ, with each
    rank's value. Returns every rank's `values`, in rank order (the same table on every rank).

    An all-gather rather than an all-reduce (MAX) of [failed, h, -h]: measured on 2 gloo CPU ranks through the
    torch.distributed functions, all_gather of 4 int64 260-300 us against all_reduce of 3 int64 340-390 us. (The
    per-call agreement sums a table instead, issued on the group's own method: `agree_start`'s `issue_sum`.)
    """
    return agree_start(what, description, local_error, group, failed=failed, timeout_s=timeout_s,
                       values=values).settle()


def agree_start(what: str, description, local_error: BaseException | None = None, group=None, *,
                failed: str = "failed its checks", timeout_s: float | None = None,
                values: tuple[int, ...] = (), fp: str | None = None,
                buffers: AgreementBuffers | None = None, issue_sum=None, payload=None,
                payload_bytes: int = 0) -> PendingAgreement:
    """`agree`'s round 1, issued and not waited for: every rank must `settle()` it (before any other collective
    whose sizes depend on what is being agreed). `fp`: the description's fingerprint, when the caller has a faster
    one (hex; every rank must compute it alike). The table is all-gathered (`dist.all_gather_into_tensor`), or with
    `issue_sum(rows, group)` -> work, gathered by a sum all-reduce, each rank's row in its own slot (the per-call
    agreement passes compat's: issuing it costs the caller less than the all-gather, measured on gloo). `buffers`: the caller's reused `AgreementBuffers`
    (default: new ones). `payload`: uint8 tensors sent after the integers, `payload_bytes` at most in all (every
    rank passes the same `payload_bytes`, payload or not), read after settling with `payloads()`. `description`
    may be a function returning it, with `fp` given: called only to explain a mismatch (the per-call agreement
    fingerprints a call's arguments without describing them)."""
    if callable(description) and fp is None:
        raise TypeError("diffpar: agree_start with a description to build later needs its fingerprint (fp)")
    return PendingAgreement(what, description, local_error, group, failed, timeout_s, tuple(values), fp,
                            buffers, issue_sum, payload, payload_bytes)


def _issue_all_gather(output, input_tensor, group):
    return dist.all_gather_into_tensor(output, input_tensor, group=group, async_op=True)


# The settle of the call agreement in flight (at most one): run by the first point of the call that needs the
# ranks agreed (a collective diffpar issues, a parallel module's forward, the call's first random draw), so the
# exchange's round trip overlaps the local work before it. Empty almost always: checking it costs one truth test.
_DEFERRED: list = []


def defer_settle(settle, ready=None) -> None:
    """Make `settle` (no arguments) the agreement in flight; one left over from an earlier call is settled first.
    `ready()`: whether settling it would not wait (`deferred_ready`)."""
    settle_deferred()
    _DEFERRED.append((settle, ready))


def settle_deferred() -> None:
    """Finish the agreement in flight, if any: raises its mismatch (the same on every rank) or timeout here.
    Called before every collective diffpar issues inside a call and where a call first needs the ranks agreed."""
    if _DEFERRED:
        _DEFERRED.pop()[0]()


def discard_deferred() -> None:
    """Forget the agreement in flight without waiting (an interrupted call). Its collective, on a group carrying
    the timeout, ends by itself."""
    _DEFERRED.clear()


def deferred_pending() -> bool:
    return bool(_DEFERRED)


def deferred_ready() -> bool:
    """Whether the agreement in flight (if any) has arrived: settling it now would not wait."""
    if not _DEFERRED:
        return True
    ready = _DEFERRED[-1][1]
    return ready is None or ready()


def _explain(what: str, description: dict, fp: str, local_error, group, failed: str, timeout_s, carries) -> None:
    """`agree`'s round 2, only to explain: every rank's description and error, as JSON; raises on every rank."""
    payload = {
        "fp": fp,
        "desc": description() if callable(description) else description,
        "error": None
        if local_error is None
        else [type(local_error).__name__, str(local_error), "".join(traceback.format_exception(local_error))],
    }
    gathered = _exchange_json(payload, group, what, timeout_s, carries)
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
                if fields:
                    diffs.append(f"rank {r} differs from rank 0 in {[k for k, _, _ in fields]}: {shown}{more}")
                else:  # fingerprinted at the call's start, described now: equal descriptions, different values
                    diffs.append(f"rank {r} differs from rank 0 in a value its description does not show (a float's "
                                 "sign of zero, or an argument changed in place after the call started)")
        hint = ""
        if any("weights" in d for d in diffs):
            hint = (" Weights differ between ranks: load the same checkpoint on every rank, and change weights "
                    "(LoRAs, adapter scales) on every rank alike.")
        raise RankMismatchError(
            f"{what}: ranks were given different configurations, so their collectives would not match (a hang "
            f"or a wrong image). {'; '.join(diffs)}. Every rank must run the same script with the same "
            f"arguments.{hint}"
        )
