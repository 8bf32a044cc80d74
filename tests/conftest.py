import os
import sys

import pytest

# Worker functions live in tests/workers/ and are imported by name in the rank processes.
sys.path.insert(0, os.path.dirname(__file__))

from diffpar.testing import get_pool, shutdown_pools  # noqa: E402
from diffpar.testing.pool import preimport  # noqa: E402

preimport()


@pytest.fixture(scope="session", autouse=True)
def _pools():
    yield
    shutdown_pools()


def run_ranks(world_size: int, fn_ref: str, timeout: float = 180, **kwargs):
    """Run tests/workers/<module>:<fn> on `world_size` gloo ranks; returns per-rank results."""
    return get_pool(world_size).run(fn_ref, timeout=timeout, **kwargs)


@pytest.fixture
def ranks():
    return run_ranks
