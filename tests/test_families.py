"""The family harness: every denoiser case in `diffpar.testing.coverage` (one module per family under
`src/diffpar/testing/tiny_models/`) on every layout it lists, against the same seeded tiny model in one process.

Context parallel: fp32 within CP_FP32, detach bit for bit, and the split proven (sequence per rank inside
attention, collectives issued). Tensor parallel (alone and with Ulysses): within TRANSFORMER_TP_FP32, each rank
holds a fraction of the block weights, the plan's byte count is what a rank holds, detach bit for bit.
A class that cannot be split: the refusal names the reason the case gives, in one process, before any change.
"""
import pytest
from tolerances import BITWISE, CP_FP32, TRANSFORMER_TP_FP32

from diffpar.testing.coverage import CP_LAYOUTS, TP_LAYOUTS, class_available, harness_cases
from diffpar.testing.probes import assert_split

CASES = harness_cases()


def _params(kind: str):
    params = []
    for case in CASES:
        if case.refused:
            continue
        for layout in (case.cp if kind == "cp" else case.tp):
            params.append(pytest.param(case, layout, id=f"{case.builder}-{layout}"))
    return params


def _require(case):
    if not class_available(case.class_name):
        pytest.skip(f"this diffusers release has no {case.class_name}")


@pytest.mark.parametrize("case,layout", _params("cp"))
def test_family_cp_matches_one_process(ranks, expect_cp, case, layout):
    _require(case)
    world, config, seq, text = CP_LAYOUTS[layout]
    results = expect_cp(ranks, world, config, "workers.cp_transformers:cp_equivalence", model_name=case.builder,
                        seq=seq, text=text, model_kwargs=case.model_kwargs, input_kwargs=case.input_kwargs)
    if results is None:
        return  # the installed diffusers cannot run this layout; every rank said so clearly
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0, "detach must restore the model bit for bit"
    assert len({r["shape"] for r in results}) == 1
    assert_split(results, config)


@pytest.mark.parametrize("case,layout", _params("tp"))
def test_family_tp_matches_one_process(ranks, case, layout):
    _require(case)
    world, config = TP_LAYOUTS[layout]
    seq, text = (16, 8) if "ulysses_size" in config else (15, 7)
    results = ranks(world, "workers.transformer_tp:tp_equivalence", model_name=case.builder, config=config,
                    seq=seq, text=text, model_kwargs=case.model_kwargs, input_kwargs=case.input_kwargs)
    tp = config["tp_size"]
    for r in results:
        assert r["diff"] <= TRANSFORMER_TP_FP32, (r["rank"], r["diff"])
        assert r["bytes_ratio"] < 1 - 0.4 * (1 - 1 / tp), "each rank must hold a fraction of the block weights"
        assert r["plan_bytes_match"], "the plan's per-rank weight bytes must be what a rank holds"
        assert r["detach_diff"] == BITWISE and r["detach_weights_equal"]
        if "ulysses_size" in config:
            assert any("context-parallel" in s for s in r["steps"]), r["steps"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.builder) for c in CASES if c.refused])
def test_family_refusal_names_the_reason(case):
    import diffpar
    from diffpar.testing import tiny_transformers

    _require(case)
    model, _ = tiny_transformers.build(case.builder, **case.model_kwargs)
    with pytest.raises(diffpar.UnsupportedError) as err:
        diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=2), world_size=2)
    assert case.refused in str(err.value)


def test_every_case_names_a_real_builder_and_layouts():
    from diffpar.testing import tiny_transformers

    tiny_transformers.build  # noqa: B018 (the builders register on first use)
    from diffpar.testing.coverage import load_family_builders

    load_family_builders()
    for case in CASES:
        assert case.builder in tiny_transformers.BUILDERS, case
        assert set(case.cp) <= set(CP_LAYOUTS) and set(case.tp) <= set(TP_LAYOUTS), case
        assert case.refused or case.cp or case.tp, f"{case.builder}: a case must test something or say why not"
