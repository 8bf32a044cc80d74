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


def unsupported_reason(config: dict):
    """The UnsupportedError message diffpar gives for `config` on the installed diffusers, or None if it can run."""
    from diffpar import ParallelismConfig, UnsupportedError
    from diffpar.engines.context_parallel_config import context_parallel_kwargs

    try:
        context_parallel_kwargs(ParallelismConfig(**config))
    except UnsupportedError as exc:
        return str(exc)
    return None


@pytest.fixture
def expect_cp():
    """Run a CP case; where the installed release cannot, assert every rank got diffpar's clear refusal."""
    from diffpar.testing import RankFailure

    def run(ranks_fn, world, config, fn_ref, **kwargs):
        reason = unsupported_reason(config)
        if reason is None:
            return ranks_fn(world, fn_ref, config=config, **kwargs)
        with pytest.raises(RankFailure) as err:
            ranks_fn(world, fn_ref, config=config, **kwargs)
        assert f"{world} rank(s) failed" in str(err.value) and reason in str(err.value)
        return None

    return run
