"""Transformer tensor parallelism (`tp_size`). Not available yet in this release: refused clearly."""
from __future__ import annotations

from ..errors import UnsupportedError


def check_tensor_parallel(model, tp_degree: int) -> None:
    raise UnsupportedError(
        f"tp_size={tp_degree} for the transformer ({type(model).__name__}) is not available in this diffpar release. "
        "Use ulysses_size / ring_size for the transformer; text encoders in extra_parallel_modules are tensor-parallel "
        "already."
    )


def apply_tensor_parallel(model, config, tp_mesh, handle, name):  # pragma: no cover - guarded by the check
    check_tensor_parallel(model, config.tp_degree)
