"""The test pool isolates tests: whatever a failed call leaves in its rank processes cannot reach the next test."""
import pytest

from diffpar.testing import RankFailure
from diffpar.testing.pool import LeakedStateError


def test_a_failed_call_leaves_nothing_for_the_next(ranks):
    before = ranks(2, "workers.isolation:process_state")
    with pytest.raises((RankFailure, LeakedStateError)) as err:
        ranks(2, "workers.isolation:leave_state_and_raise")
    assert "fails on purpose" in str(err.value)
    after = ranks(2, "workers.isolation:process_state")
    for b, a in zip(before, after):
        assert not a["dirty"] and not a["shims"] and a["backend"] == "native", a
        assert a["pid"] != b["pid"], "the failed call's processes must be replaced, not reused"
