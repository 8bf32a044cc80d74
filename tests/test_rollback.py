"""A failure in any apply step, on one rank or on all, leaves every rank's pipeline exactly as it was, fast.

The failure is injected right after the step made its change (the harshest point: a partial apply), through
`diffpar.applying.apply_step`, the seam every step runs through. Every rank must raise (the failing one its own
error, the others diffpar's "rank r failed while applying" from the status collective), no rank may hang, and
weights, hooks, processors and the image must be bit for bit what they were before `enable_cache`.
"""
import pytest

from diffpar.applying import APPLY_STEPS

pytestmark = pytest.mark.compat

CP = ({"ulysses_size": 2}, ["text_encoder", "text_encoder_2", "vae"])
TP = ({"tp_size": 2}, ["text_encoder_2"])
CFG = ({"cfg_size": 2}, ["text_encoder", "vae"])  # the cfg step runs only with cfg groups
# Measured: a rolled-back enable_cache returns in under 2 s on 2 CPU ranks; a hang would reach the 60 s
# process-group timeout.
MAX_SECONDS = 30


def _cases():
    for step in APPLY_STEPS:
        config, extra = {"tensor parallel": TP, "cfg parallel": CFG}.get(step, CP)
        for who in ("one", "all"):
            yield pytest.param(step, who, config, extra, id=f"{step.replace(' ', '-')}-{who}")


@pytest.mark.parametrize("step,who,config,extra", list(_cases()))
def test_failure_in_apply_step_rolls_back_every_rank(ranks, step, who, config, extra):
    world = 2
    fail_ranks = [1] if who == "one" else list(range(world))
    results = ranks(world, "workers.rollback:inject_failure", timeout=120, step=step, fail_ranks=fail_ranks,
                    config=config, extra=extra)
    for r in results:
        assert r["step_ran"], f"the {step!r} step never ran: the case tests nothing"
        assert r["error"] is not None, f"rank {r['rank']} did not raise"
        if r["rank"] in fail_ranks:
            assert f"injected failure after the {step!r} step" in r["error"], r["error"]
        else:
            assert "rank 1 failed while applying the agreed plan" in r["error"], r["error"]
        assert r["seconds"] < MAX_SECONDS, r
        assert r["changed_weights"] == [], r
        assert r["changed_structure"] == [], r
        assert r["output_diff"] == 0.0, r
        assert not r["shims_active"], r


def test_every_apply_step_is_covered():
    """A new apply step must be added to APPLY_STEPS (and so to the cases above)."""
    import inspect

    from diffpar import applying

    source = inspect.getsource(applying._apply_local_steps)
    named = {s for s in APPLY_STEPS if f'"{s}"' in source}
    assert named == set(APPLY_STEPS), set(APPLY_STEPS) - named
    assert source.count("apply_step(") == len(APPLY_STEPS)
