"""The multi-rank harness itself: reuse, tracebacks from every rank, timeouts, no orphans."""
import os
import time

import pytest

from diffpar.testing import RankFailure, RankPool, RankTimeout

pytestmark = pytest.mark.compat  # also runs in CI's diffusers 0.36.0 leg


def test_pool_is_reused_and_single_threaded(ranks):
    first = ranks(2, "workers.basics:whoami")
    second = ranks(2, "workers.basics:whoami")
    assert [r["rank"] for r in first] == [0, 1]
    assert [r["pid"] for r in first] == [r["pid"] for r in second], "ranks must be reused across calls"
    assert all(r["threads"] == 1 for r in first)


def test_failing_rank_traceback_is_reported_first(ranks):
    with pytest.raises(RankFailure) as err:
        ranks(2, "workers.basics:raise_on", timeout=60, rank=1, message="rank one broke")
    text = str(err.value)
    assert text.index("--- rank 1") < text.index("rank one broke")
    assert "ValueError: rank one broke" in text
    # Rank 0 waits in a barrier rank 1 never enters: named, with its stack, instead of a long timeout.
    assert "ranks [0] were still waiting" in text and "--- rank 0 stacks at timeout ---" in text
    # The pool restarts after a failure and works again.
    assert [r["rank"] for r in ranks(2, "workers.basics:whoami")] == [0, 1]


def test_hang_becomes_an_error_with_stacks_and_leaves_no_process():
    pool = RankPool(2, pg_timeout=5)
    pool.start()
    pids = [p.pid for p in pool.procs]
    t0 = time.time()
    with pytest.raises(RankFailure) as err:
        pool.run("workers.basics:hang_on", timeout=20, rank=1)
    elapsed = time.time() - t0
    assert elapsed < 40
    text = str(err.value)
    # Either the process-group timeout fired on rank 0 or the deadline did; both name the ranks.
    assert "rank 0" in text or "rank 1" in text
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    pool.close()


def test_deadline_dumps_every_hung_rank_stack():
    pool = RankPool(2, pg_timeout=60)
    pool.start()
    with pytest.raises(RankTimeout) as err:
        pool.run("workers.basics:sleep", timeout=3, seconds=600)
    text = str(err.value)
    assert "did not answer within 3 s" in text
    assert "--- rank 0 stacks at timeout ---" in text and "--- rank 1 stacks at timeout ---" in text
    assert "in sleep" in text  # faulthandler shows where each rank was
    assert not pool.procs
    pool.close()
