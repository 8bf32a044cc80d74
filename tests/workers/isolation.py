"""Rank-side steps for the pool-isolation test: leave every kind of process state behind, then fail."""
from __future__ import annotations

import os

DIRTY = False  # a module global a failed call sets: only a fresh process has it False again


def leave_state_and_raise():
    global DIRTY
    from diffpar.compat import diffusers_cp

    DIRTY = True
    diffusers_cp.SHARED_SHIMS.acquire()  # compat shims installed, never released
    diffusers_cp.set_active_backend("_native_math")  # process-wide attention backend changed
    raise RuntimeError("this call fails on purpose, after changing process state")


def process_state():
    from diffpar.compat import diffusers_cp

    return {"pid": os.getpid(), "dirty": DIRTY, "shims": diffusers_cp.SHARED_SHIMS.active,
            "backend": diffusers_cp.active_backend_name()}
