"""Every wait bounded, every exit clean (issue 10, items 3 and 8).

1. The groups of diffpar's mesh carry `timeout_s`: a wait inside diffusers' Ulysses all-to-all on a sub-group ends
   after it (not after torch's 30-minute default), with an error naming the collective and its group.
2. A rank whose wait timed out can exit: no pending work keeps it alive, no abort at teardown.
3. A plain user script (no `end_process`) exits 0 under torchrun with no "terminate called" abort.
"""
import time

import pytest

from diffpar.testing import get_pool

pytestmark = pytest.mark.compat

TIMEOUT_S = 5.0
# Measured on 2 loaded CPU cores: the waiting rank fails 5.0-5.1 s after its call starts with timeout_s=5 (and
# waited past 25 s before the mesh's groups carried the timeout). The margin is for a loaded machine.
MARGIN_S = 20.0


def _run_world4(mode: str) -> list[dict]:
    try:
        return get_pool(4).run("workers.bounded_waits:subgroup_wait_times_out", timeout=120, timeout_s=TIMEOUT_S,
                               mode=mode)
    finally:
        get_pool(4).kill()  # rank 0's timed-out group must not pair with a later test's collective


def _assert_ranks_2_3_split_and_finished(results):
    for r in results[2:]:
        assert r["error"] is None, r
        split = r["split"]
        assert split["image_tokens"] == [8] and split["text_tokens"] == [4], split  # 16 + 8 tokens over 2 ranks
        assert split["group_sizes"]["funcol.all_to_all_single"] == [2], split  # on the ulysses sub-group


def test_rank_failing_mid_call_bounds_the_subgroup_wait_world4():
    """Ulysses 2 at world 4 (two model copies): rank 1 raises inside its first block, after the call was agreed.
    Rank 0, its Ulysses partner, fails after timeout_s in the all-to-all, naming it and the group [0, 1]."""
    results = _run_world4("raises")
    r0, r1 = results[0], results[1]
    assert r0["error"] == "DiffparError", r0
    for fragment in ("a call of FluxTransformer2DModel.forward", "a collective on the group of ranks [0, 1]",
                     "_all_to_all_single (diffusers/models/attention_dispatch.py", "did not complete within "
                     "timeout_s=5 s", "Timed out waiting 5000ms", "ParallelismConfig(timeout_s=...)"):
        assert fragment in r0["message"], (fragment, r0["message"])
    assert TIMEOUT_S - 0.5 <= r0["seconds"] < TIMEOUT_S + MARGIN_S, r0
    assert r1["error"] == "SimulatedFailure" and r1["seconds"] < MARGIN_S, r1
    assert r0["split"]["image_tokens"] == [8], r0  # rank 0 got as far as its split attention
    _assert_ranks_2_3_split_and_finished(results)


def test_rank_skipping_an_unagreed_call_bounds_the_subgroup_wait_world4():
    """The same without per-call agreement (`check_every_call=False`), rank 1 never calling the model: rank 0's
    wait in the all-to-all on its sub-group still ends after timeout_s (gloo's own message: nothing of diffpar's
    wraps the call to name it)."""
    results = _run_world4("skips")
    r0 = results[0]
    assert r0["error"] == "RuntimeError" and "Timed out waiting 5000ms" in r0["message"], r0
    assert TIMEOUT_S - 0.5 <= r0["seconds"] < TIMEOUT_S + MARGIN_S, r0
    assert results[1].get("skipped"), results[1]
    _assert_ranks_2_3_split_and_finished(results)


def test_rank_skipping_an_agreed_call_world4():
    """With per-call agreement (the default) a rank that skips the call is caught in the agreement, on the whole
    world: every other rank, in both model copies, fails after timeout_s saying which call waited."""
    results = _run_world4("skips_agreed")
    assert results[1].get("skipped"), results[1]
    for r in (results[0], results[2], results[3]):
        assert r["error"] == "DiffparError", r
        assert "a call of FluxTransformer2DModel.forward: waited 5 s for the other ranks" in r["message"], r
        assert TIMEOUT_S - 0.5 <= r["seconds"] < TIMEOUT_S + MARGIN_S, r
        assert r["split"]["image_tokens"] == [], r  # the agreement stopped the call before any attention
