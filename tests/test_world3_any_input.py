"""Issue 10 item 5 at world 3: every model case with a context-parallel plan in `diffpar.testing.coverage` (the
family harness's cases, which tests/test_families.py runs, and the first families', which their own files run)
with the DEFAULT config (no `*_anything` option) on an input no split over 3 ranks divides: an odd prompt (7
tokens), an image-token count 3 does not divide, batch 2. Ulysses 3 for every case, Ring 3 where the case's
layouts include the ring. Each against the same seeded model in one process (CP_FP32), detach bit for bit, and
the work proven split 3 ways unevenly (tokens per rank as diffusers' uneven split cuts them, the mode's
collective in every attention call).

Releases without the uneven path (before 0.38, for Ulysses and for Ring) refuse such lengths on every rank; that
refusal, naming the dimension and its source, is asserted at world 3 by tests/test_any_input.py (`w3-ulysses`,
`w3-ring`), so these tests skip there.

One rank-pool call per test: the pool (src/diffpar/testing/pool.py) forks the 3 ranks once and reuses them for
every test, so a call costs about 0.03 s over the forwards themselves (measured: 70 cases in one call each,
10.4 s). The whole file: 148 tests in 40 s, 65 s with start-up, on 2 cores at load average 21.
"""
import inspect

import pytest
from tolerances import CP_FP32

from diffpar.compat import diffusers_cp
from diffpar.testing.coverage import CP_LAYOUTS, FIRST_CASES, class_available, harness_cases, load_family_builders
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
    # First families: Wan and HunyuanVideo take one latent frame for SEQ tokens; SD3's position table holds 16
    # columns (Z-Image pads every sample to a multiple of 32 tokens: 32, which 3 does not divide).
    "wan": {"seq": SEQ, "input_kwargs": {"frames": 1}},
    "hunyuan_video": {"seq": SEQ, "input_kwargs": {"frames": 1}},
    "sd3": {"seq": 13},
}

# Plans of diffpar's own whose forward returns per-sample lists (Z-Image) or trims the prompt (HunyuanVideo): their
# worker (tests/workers/cp_plans_ours.py) compares those outputs; the split check lets HunyuanVideo cut its prompt.
OURS_WORKER = {"zimage", "sd3", "hunyuan_video"}

MODES = {
    "ulysses3": {"ulysses_size": 3},
    "ring3": {"ring_size": 3},
}


def _has_ring(case) -> bool:
    return any(CP_LAYOUTS[layout][1].get("ring_size", 1) > 1 for layout in case.cp)


def _cases():
    """Every case with context-parallel layouts: the harness's, then the first families' (their harness entries
    list tensor-parallel layouts only)."""
    return [case for case in (*harness_cases(), *FIRST_CASES) if case.cp and not case.refused]


def _params():
    params = []
    for case in _cases():
        for mode in MODES:
            if mode == "ring3" and not _has_ring(case):
                continue
            params.append(pytest.param(case, mode, id=f"{case.builder}-{mode}"))
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
    inputs = {**case.input_kwargs, **chosen.get("input_kwargs", {})}
    seq = chosen.get("seq", SEQ)
    ours = case.builder in OURS_WORKER
    if ours:
        results = ranks(WORLD, "workers.cp_plans_ours:cp_equivalence", model_name=case.builder, config=config,
                        model_kwargs=_model_kwargs(case, mode),
                        input_kwargs={"seq": seq, "text": TEXT, "batch": BATCH, **inputs})
    else:
        results = ranks(WORLD, "workers.cp_transformers:cp_equivalence", model_name=case.builder, config=config,
                        seq=seq, text=TEXT, batch=BATCH, model_kwargs=_model_kwargs(case, mode), input_kwargs=inputs)
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0, "detach must restore the model bit for bit"
    if not ours:
        assert len({r["shape"] for r in results}) == 1
    assert_split(results, config, text_cut=case.builder == "hunyuan_video")
    # Really uneven: the one-process image-token count is no multiple of 3, and the ranks hold tensor_split's
    # shares of it (assert_split checks every forward; this pins the input this test is about).
    image_tokens = results[0]["split_reference"]["image_tokens"][0]
    assert image_tokens % WORLD, f"{case.builder}: {image_tokens} image tokens divide over {WORLD}; pick another input"
    held = sorted(r["split"]["image_tokens"][0] for r in results)
    assert held == sorted(expected_shards(image_tokens, WORLD)) and len(set(held)) == 2, held
