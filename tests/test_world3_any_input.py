"""Issue 10 item 5 at world 3: every family-harness case with a context-parallel plan (`diffpar.testing.coverage`,
the cases tests/test_families.py runs) with the DEFAULT config (no `*_anything` option) on an input no split over
3 ranks divides: an odd prompt (7 tokens), an image-token count the degree does not divide, batch 2. Ulysses 3 for
every case, Ring 3 where the case's layouts include the ring. Each against the same seeded model in one process
(CP_FP32), detach bit for bit, and the work proven split 3 ways unevenly (tokens per rank as diffusers' uneven
split cuts them, the collective of the mode in every attention call).

Releases without the uneven path (0.36 and 0.37 for Ulysses, 0.36 and 0.37 for Ring) refuse such lengths on every
rank; that refusal, naming the dimension and its source, is asserted at world 3 by tests/test_any_input.py
(`w3-ulysses`, `w3-ring`), so these tests skip there.

The rank pool (src/diffpar/testing/pool.py) forks the 3 ranks once and reuses them for every test, so one call per
case costs about 0.05 s over the forward itself (the whole file: about 20 s on 2 loaded cores).
"""
import inspect

import pytest
from tolerances import CP_FP32

from diffpar.compat import diffusers_cp
from diffpar.testing.coverage import CP_LAYOUTS, class_available, harness_cases, load_family_builders
from diffpar.testing.probes import assert_split, expected_shards

WORLD = 3
TEXT = 7  # prompt tokens: odd, and not a multiple of 3
BATCH = 2
SEQ = 17  # image tokens for most builders: odd, not a multiple of 3

# Builders whose token count for SEQ is a multiple of 3: the input that gives them one that is not.
# Wan-derived video builders lay out 3 latent frames for an odd length (always a multiple of 3 tokens) and 2 for an
# even one: 14 gives 2 frames of 7. The HunyuanVideo image-to-video builder keeps 3 frames unless told: 5 frames of 5.
INPUTS = {
    "minimax_h3": {"seq": 13},  # 23 tokens
    "skyreels_v2": {"seq": 14},
    "skyreels_v2_df": {"seq": 14},
    "skyreels_v2_i2v": {"seq": 14},
    "wan_animate": {"seq": 14},
    "hunyuan_video_i2v": {"seq": SEQ, "input_kwargs": {"frames": 5}},
}

MODES = {
    "ulysses3": {"ulysses_size": 3},
    "ring3": {"ring_size": 3},
}

# Families other engineers own today: a failure here is theirs to fix (exact cause given), strict so that a fix
# shows. None fail at present.
OWNED_ELSEWHERE: dict[tuple[str, str], str] = {}


def _has_ring(case) -> bool:
    return any(CP_LAYOUTS[layout][1].get("ring_size", 1) > 1 for layout in case.cp)


def _params():
    params = []
    for case in harness_cases():
        if case.refused or not case.cp:
            continue
        for mode in MODES:
            if mode == "ring3" and not _has_ring(case):
                continue
            marks = []
            if (case.builder, mode) in OWNED_ELSEWHERE:
                marks.append(pytest.mark.xfail(strict=True, reason=OWNED_ELSEWHERE[(case.builder, mode)]))
            params.append(pytest.param(case, mode, id=f"{case.builder}-{mode}", marks=marks))
    return params


def _model_kwargs(case, mode: str) -> dict:
    """The case's builder options; under Ulysses 3 every rank needs whole heads, so 3 query heads (or, where the
    builder has grouped key/value heads, 3 of those and as many query heads per group as the case has)."""
    kwargs = dict(case.model_kwargs)
    if mode != "ulysses3":
        return kwargs
    from diffpar.testing import tiny_transformers

    load_family_builders()
    parameters = inspect.signature(tiny_transformers.BUILDERS[case.builder]).parameters
    default_kv = parameters["kv_heads"].default if "kv_heads" in parameters else None
    heads = kwargs["heads"]  # every case names its heads
    kv_heads = kwargs.get("kv_heads", default_kv)
    if kv_heads is None or kv_heads == 1:  # every query head has its own key/value head, or all share one
        kwargs["heads"] = WORLD
    else:
        kwargs["heads"], kwargs["kv_heads"] = WORLD * (heads // kv_heads), WORLD
    return kwargs


@pytest.mark.parametrize("case,mode", _params())
def test_default_config_runs_any_input_at_world_3(ranks, case, mode):
    config = MODES[mode]
    if not class_available(case.class_name):
        pytest.skip(f"this diffusers release has no {case.class_name}")
    if diffusers_cp.uneven_split_option(config.get("ulysses_size", 1), config.get("ring_size", 1)) is None:
        pytest.skip("no uneven split on this release: the refusal at world 3 is asserted by tests/test_any_input.py")
    chosen = INPUTS.get(case.builder, {})
    results = ranks(WORLD, "workers.cp_transformers:cp_equivalence", model_name=case.builder, config=config,
                    seq=chosen.get("seq", SEQ), text=TEXT, batch=BATCH, model_kwargs=_model_kwargs(case, mode),
                    input_kwargs={**case.input_kwargs, **chosen.get("input_kwargs", {})})
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0, "detach must restore the model bit for bit"
    assert len({r["shape"] for r in results}) == 1
    assert_split(results, config)
    # Really uneven: the one-process image-token count is no multiple of 3, and the ranks hold tensor_split's
    # shares of it (assert_split checks every forward; this pins the input this test is about).
    image_tokens = results[0]["split_reference"]["image_tokens"][0]
    assert image_tokens % WORLD, f"{case.builder}: {image_tokens} image tokens divide over {WORLD}; pick another input"
    held = sorted(r["split"]["image_tokens"][0] for r in results)
    assert held == sorted(expected_shards(image_tokens, WORLD)) and len(set(held)) == 2, held
