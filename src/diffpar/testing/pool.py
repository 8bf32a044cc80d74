"""A pool of rank processes for multi-process tests on CPU (gloo), reused across tests.

- Ranks are forked once per world size and keep their process group; each test sends "module:function" and
  keyword arguments to every rank and gets every rank's result back.
- Every call has a deadline. On a hang, each rank dumps its Python stacks (faulthandler, SIGUSR1), the pool is
  killed, and the error shows where every rank was. A rank's exception is reported with its traceback and the
  time it happened, earliest first (a peer's "connection closed" is a consequence, not the cause).
- Any failure restarts the pool, so one broken process group never leaks into the next test.
- Ranks die with the parent (PR_SET_PDEATHSIG) and are killed at exit: no orphans.

Fork is used (about 0.1-0.5 s for 4 ranks when torch, diffusers and transformers are already imported in the
parent) with file-based rendezvous: forking while the parent holds a TCP store can deadlock.
"""
from __future__ import annotations

import atexit
import ctypes
import faulthandler
import importlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

_POOLS: dict[int, "RankPool"] = {}


class RankFailure(RuntimeError):
    """One or more ranks raised. The message has every rank's traceback, earliest first."""


class RankTimeout(RankFailure):
    """A call did not finish before its deadline. The message has every rank's stacks at that moment."""


def preimport() -> None:
    """Import what every rank needs before forking, so ranks start in a fraction of a second."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (the first functional collective would import it: 1-2.5 s)
    import torch.distributed  # noqa: F401

    try:
        import diffusers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        pass


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LeakedStateError(AssertionError):
    """A test left process-wide state behind (compat shims still installed, the default attention backend
    changed): it would change the next test's result. Not a RankFailure, so `pytest.raises(RankFailure)` in an
    error-path test does not swallow it."""


def _leaked_state() -> list[str]:
    """Process-wide state a finished call should not have left behind."""
    leaks = []
    try:
        from diffpar.compat.diffusers_cp import SHARED_SHIMS, active_backend_name
    except Exception:  # noqa: BLE001 (diffusers missing: nothing of ours can leak)
        return leaks
    if SHARED_SHIMS.active:
        leaks.append("diffusers compat shims are still installed (a handle was neither detached nor rolled back)")
    if active_backend_name() != "native":
        leaks.append(f"the process-wide attention backend is {active_backend_name()!r}, not 'native'")
    return leaks


def _reset_process_state() -> None:
    """Undo process-wide state a test left behind, so the next test starts clean (the test itself is failed)."""
    try:
        from diffpar.compat.diffusers_cp import SHARED_SHIMS, set_active_backend

        set_active_backend("native")
        SHARED_SHIMS.reset()
    except Exception:  # noqa: BLE001
        pass


def _worker(rank: int, world: int, init_file: str, conn, stack_file: str, pg_timeout: float) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(stack_file, "w") as f:
        pass
    stack_fh = open(stack_file, "a")
    faulthandler.register(signal.SIGUSR1, file=stack_fh, all_threads=True)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("DIFFPAR_TEST_THREADS", "1")))
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
            timeout=timedelta(seconds=pg_timeout),
        )
        conn.send_bytes(pickle.dumps(("ready", rank)))
    except BaseException:
        conn.send_bytes(pickle.dumps(("err", time.time(), traceback.format_exc())))
        return
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        if msg is None:
            break
        fn_ref, kwargs = msg
        try:
            module_name, fn_name = fn_ref.split(":")
            fn = getattr(importlib.import_module(module_name), fn_name)
            result = fn(**kwargs)
            payload = pickle.dumps(("ok", result))
        except BaseException:
            payload = pickle.dumps(("err", time.time(), traceback.format_exc()))
        leaks = _leaked_state()
        if leaks:
            raised = pickle.loads(payload)
            after = f" (after the call raised:\n{raised[2].strip()})" if raised[0] == "err" else ""
            payload = pickle.dumps(("leak", time.time(), "; ".join(leaks) + after))
            _reset_process_state()
        try:
            conn.send_bytes(payload)
        except (BrokenPipeError, OSError):
            break
    try:
        dist.destroy_process_group()
    except Exception:
        pass


class RankPool:
    def __init__(self, world_size: int, *, pg_timeout: float = 60.0, error_grace: float = 5.0):
        self.world_size = world_size
        self.pg_timeout = pg_timeout
        # After the first rank fails, how long the others get to report their own error before they are taken as
        # stuck in a collective the failed rank will never enter (their stacks are dumped, the pool restarted).
        self.error_grace = error_grace
        self.procs: list = []
        self.conns: list = []
        self._tmp = None
        self.starts = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        preimport()
        self._tmp = tempfile.TemporaryDirectory(prefix=f"diffpar-pool{self.world_size}-")
        init_file = os.path.join(self._tmp.name, "rendezvous")
        ctx = mp.get_context("fork")
        sys.stdout.flush()
        sys.stderr.flush()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            stack_file = os.path.join(self._tmp.name, f"stacks-{rank}.txt")
            proc = ctx.Process(
                target=_worker, args=(rank, self.world_size, init_file, child, stack_file, self.pg_timeout),
                name=f"diffpar-rank{rank}", daemon=True,
            )
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self.starts += 1
        replies = self._collect(timeout, "starting the pool")
        bad = [r for r in replies if r[0] != "ready"]
        if bad:
            self.kill()
            raise RankFailure(self._format_errors({i: r for i, r in enumerate(replies) if r[0] == "err"}, "start"))

    @property
    def alive(self) -> bool:
        return bool(self.procs) and all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        for c in self.conns:
            c.close()
        self.procs, self.conns = [], []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def close(self) -> None:
        for c in self.conns:
            try:
                c.send_bytes(pickle.dumps(None))
            except OSError:
                pass
        deadline = time.time() + 10
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.time()))
        self.kill()

    # -- calls -------------------------------------------------------------------------------------------------
    def run(self, fn_ref: str, *, timeout: float = 120.0, **kwargs) -> list:
        """Run `module:function(**kwargs)` on every rank; return the results in rank order."""
        if not self.alive:
            self.kill()
            self.start()
        for c in self.conns:
            c.send_bytes(pickle.dumps((fn_ref, kwargs)))
        try:
            replies = self._collect(timeout, fn_ref)
        except RankFailure:
            self.kill()
            raise
        leaks = {r: rep[2] for r, rep in enumerate(replies) if rep[0] == "leak"}
        if leaks:
            self.kill()
            raise LeakedStateError(
                f"{fn_ref} left process-wide state behind, which could change the next test's result: "
                + "; ".join(f"rank {r}: {text}" for r, text in sorted(leaks.items()))
            )
        errors = {r: rep for r, rep in enumerate(replies) if rep[0] != "ok"}
        if errors:
            self.kill()  # the process group may be broken: the next call starts fresh ranks
            raise RankFailure(self._format_errors(errors, fn_ref))
        return [rep[1] for rep in replies]

    def _collect(self, timeout: float, what: str) -> list:
        replies: dict[int, tuple] = {}
        deadline = time.time() + timeout
        first_error_at = None
        pending = {c: r for r, c in enumerate(self.conns)}
        while pending:
            now = time.time()
            limit = deadline if first_error_at is None else min(deadline, first_error_at + self.error_grace)
            if now >= limit:
                break
            for c in wait(list(pending), timeout=min(1.0, limit - now)):
                r = pending.pop(c)
                try:
                    replies[r] = pickle.loads(c.recv_bytes())
                except (EOFError, OSError):
                    code = self.procs[r].exitcode if r < len(self.procs) else None
                    replies[r] = ("err", time.time(), f"rank {r} process died (exit code {code})\n")
                if replies[r][0] == "err" and first_error_at is None:
                    first_error_at = time.time()
            for c, r in list(pending.items()):
                if not self.procs[r].is_alive():
                    pending.pop(c)
                    replies[r] = ("err", time.time(), f"rank {r} process died (exit code {self.procs[r].exitcode})\n")
                    first_error_at = first_error_at or time.time()
        if pending and first_error_at is not None:
            known = {r: rep for r, rep in replies.items() if rep[0] == "err"}
            msg = self._format_errors(known, what)
            msg += (f"\nranks {sorted(pending.values())} were still waiting {self.error_grace:.0f} s after the first "
                    "failure (most likely in a collective the failed rank never entered):\n")
            msg += self._dump_stacks(sorted(pending.values()))
            raise RankFailure(msg)
        if pending:
            stacks = self._dump_stacks(sorted(pending.values()))
            known = {r: rep for r, rep in replies.items() if rep[0] == "err"}
            msg = (
                f"{what}: ranks {sorted(pending.values())} did not answer within {timeout:.0f} s "
                f"(a hang: ranks entered different collectives, or one is still computing).\n"
            )
            if known:
                msg += self._format_errors(known, what) + "\n"
            msg += stacks
            raise RankTimeout(msg)
        return [replies[r] for r in range(len(self.conns))]

    def _dump_stacks(self, ranks) -> str:
        for r in ranks:
            try:
                os.kill(self.procs[r].pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
        time.sleep(1.0)
        out = []
        for r in ranks:
            path = os.path.join(self._tmp.name, f"stacks-{r}.txt") if self._tmp else None
            text = open(path).read() if path and os.path.exists(path) else "(no stack dump)"
            out.append(f"--- rank {r} stacks at timeout ---\n{text[-6000:]}")
        return "\n".join(out)

    @staticmethod
    def _format_errors(errors: dict, what: str) -> str:
        ordered = sorted(errors.items(), key=lambda kv: kv[1][1])
        parts = [f"{what}: {len(errors)} rank(s) failed; earliest first:"]
        t0 = ordered[0][1][1]
        for r, (_, t, tb) in ordered:
            parts.append(f"--- rank {r} (+{t - t0:.2f} s) ---\n{tb}")
        return "\n".join(parts)


def get_pool(world_size: int) -> RankPool:
    pool = _POOLS.get(world_size)
    if pool is None:
        pool = RankPool(world_size)
        _POOLS[world_size] = pool
    if not pool.alive:
        pool.kill()
        pool.start()
    return pool


def shutdown_pools() -> None:
    for pool in list(_POOLS.values()):
        pool.close()
    _POOLS.clear()


atexit.register(shutdown_pools)
