"""Transformer tensor parallelism (tp_size), alone and with Ulysses / Ring on a 2-D mesh, vs one process.

Flux, Flux2 and QwenImage run diffusers' own `_tp_plan` (0.40+, CPU allowed by diffpar's shim) and, forced, our
plans (what releases before 0.40 get); Wan and Z-Image only have ours. Every case checks the output, a per-rank
weight footprint below the whole model, and a bit-for-bit detach (weights gathered back).
"""
import pytest
from tolerances import BITWISE, TRANSFORMER_TP_FP32

# (model, plan engine forced to ours, model overrides, input overrides)
MODELS = [
    pytest.param("flux", False, {}, {}, id="flux-diffusers-plan"),
    pytest.param("flux", True, {}, {}, id="flux-diffpar-plan"),
    pytest.param("flux2", False, {}, {}, id="flux2-diffusers-plan"),
    pytest.param("flux2", True, {}, {}, id="flux2-diffpar-plan"),
    pytest.param("qwenimage", False, {}, {}, id="qwenimage-diffusers-plan"),
    pytest.param("qwenimage", True, {}, {}, id="qwenimage-diffpar-plan"),
    pytest.param("wan", False, {}, {}, id="wan"),
    pytest.param("zimage", False, {"head_dim": 24}, {}, id="zimage"),
]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("model_name,force,model_kwargs,input_kwargs", MODELS)
def test_tp_matches_one_process(ranks, world, model_name, force, model_kwargs, input_kwargs):
    from diffpar.compat.diffusers_tp import has_native_tp

    native = has_native_tp() and model_name in ("flux", "flux2", "qwenimage")  # diffusers >= 0.40 plans these
    model_kwargs = dict(model_kwargs, heads=4)  # whole heads on 2 and 4 ranks
    results = ranks(world, "workers.transformer_tp:tp_equivalence", model_name=model_name,
                    config={"tp_size": world}, seq=15, text=7, model_kwargs=model_kwargs,
                    input_kwargs=input_kwargs, force_diffpar=force)
    for r in results:
        assert r["diff"] <= TRANSFORMER_TP_FP32, (r["rank"], r["diff"])
        assert r["engine"] == ("diffusers" if native and not force else "diffpar")
        assert r["bytes_ratio"] < 1 - 0.4 * (1 - 1 / world), "each rank must hold a fraction of the block weights"
        assert r["plan_bytes_match"], "the plan's per-rank weight bytes must be what a rank holds"
        assert r["detach_diff"] == BITWISE and r["detach_weights_equal"]


# World 4 as a 2x2 mesh: context parallel over ("ring", "ulysses"), tensor parallel over "tp".
HYBRID = [
    pytest.param("flux", {"ulysses_size": 2, "tp_size": 2}, False, 16, id="flux-ulysses2xtp2"),
    pytest.param("flux", {"ring_size": 2, "tp_size": 2}, False, 16, id="flux-ring2xtp2"),
    pytest.param("flux2", {"ulysses_size": 2, "tp_size": 2}, True, 16, id="flux2-diffpar-ulysses2xtp2"),
    pytest.param("qwenimage", {"ulysses_size": 2, "tp_size": 2}, False, 16, id="qwenimage-ulysses2xtp2"),
    pytest.param("wan", {"ulysses_size": 2, "tp_size": 2}, False, 16, id="wan-ulysses2xtp2"),
    pytest.param("wan", {"ring_size": 2, "tp_size": 2}, False, 16, id="wan-ring2xtp2"),
    pytest.param("zimage", {"ulysses_size": 2, "tp_size": 2}, False, 16, id="zimage-ulysses2xtp2"),
    pytest.param("flux", {"ulysses_size": 2, "tp_size": 2, "ulysses_anything": True}, False, 15,
                 id="flux-ulysses2xtp2-anything-odd"),
]


@pytest.mark.parametrize("model_name,config,force,seq", HYBRID)
def test_hybrid_cp_tp_matches_one_process(ranks, model_name, config, force, seq):
    from diffpar.compat.diffusers_cp import cp_config_fields

    if config.get("ulysses_anything") and "ulysses_anything" not in cp_config_fields():
        pytest.skip("this diffusers release has no ulysses_anything (0.37+)")
    model_kwargs = {"heads": 4, **({"head_dim": 24} if model_name == "zimage" else {})}
    results = ranks(4, "workers.transformer_tp:tp_equivalence", model_name=model_name, config=config, seq=seq,
                    text=7 if seq % 2 else 8, model_kwargs=model_kwargs, force_diffpar=force)
    for r in results:
        assert r["diff"] <= TRANSFORMER_TP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == BITWISE and r["detach_weights_equal"]
        assert any("context-parallel" in s for s in r["steps"]) and any("tensor-parallel" in s for s in r["steps"])


def test_tp_with_data_parallel_groups(ranks):
    """tp_size=2 on 4 ranks: two tensor-parallel groups, each the whole model."""
    results = ranks(4, "workers.transformer_tp:tp_equivalence", model_name="wan", config={"tp_size": 2},
                    model_kwargs={"heads": 4})
    assert all(r["diff"] <= TRANSFORMER_TP_FP32 and r["detach_diff"] == BITWISE for r in results)


# -- errors: raised on every rank, before any collective ------------------------------------------------------


def _assert_all(messages, *parts):
    for m in messages:
        assert m is not None, "expected an error"
        for part in parts:
            assert part in m, m


def test_fewer_heads_than_ranks_names_the_largest_tp_that_works(ranks):
    # tp_size that does not divide the heads splits them unevenly (tests/test_tp_engine.py); fewer heads than
    # ranks would leave a rank with none.
    messages = ranks(4, "workers.transformer_tp:expect_error", model_name="flux", config={"tp_size": 4},
                     model_kwargs={"heads": 3})
    _assert_all(messages, "tp_size=4 is more than the 3 attention heads", "largest tp_size that works for this "
                "model is 2")


def test_fewer_heads_than_ranks_in_our_plans(ranks):
    messages = ranks(4, "workers.transformer_tp:expect_error", model_name="wan", config={"tp_size": 4},
                     model_kwargs={"heads": 3})
    _assert_all(messages, "is more than the 3 attention heads", "largest tp_size that works for this model is 2")


def test_mlp_width_not_divisible_is_split_unevenly(ranks):
    # Z-Image's MLP is int(dim / 3 * 8) wide: 85 for dim 32, odd: 43 and 42 features.
    results = ranks(2, "workers.transformer_tp:tp_equivalence", model_name="zimage", config={"tp_size": 2},
                    model_kwargs={"heads": 2})
    for r in results:
        assert r["diff"] <= TRANSFORMER_TP_FP32 and r["detach_diff"] == BITWISE, r
        assert r["local_shapes"]["layers.0.feed_forward.w1"][0] == [43, 42][r["rank"]]
        assert r["local_shapes"]["layers.0.feed_forward.w2"][1] == [43, 42][r["rank"]]


def test_hybrid_local_heads_not_divisible_by_ulysses(ranks):
    messages = ranks(4, "workers.transformer_tp:expect_error", model_name="flux",
                     config={"ulysses_size": 2, "tp_size": 2}, model_kwargs={"heads": 2})
    _assert_all(messages, "each tensor-parallel rank holds 2/2 = 1 heads", "ulysses_anything=True")


def test_model_without_plan_is_refused(ranks):
    messages = ranks(2, "workers.transformer_tp:expect_error", model_name="unplanned", config={"tp_size": 2})
    _assert_all(messages, "has a tensor-parallel plan", "Models with a plan", "ulysses_size / ring_size")


@pytest.mark.parametrize("model_name,force", [("flux", False), ("flux2", True), ("wan", False)])
def test_rollback_before_commit_is_local_and_exact(ranks, model_name, force):
    """A later step failing undoes tensor parallelism before commit: no collective, the same layers back."""
    for r in ranks(2, "workers.transformer_tp:rollback_before_commit", model_name=model_name,
                   model_kwargs={"heads": 4}, force_diffpar=force):
        assert r["collectives"] == [] and r["same_layers"] and r["restored"], r
        # The one convention for sharded weights: plain tensors holding this rank's slice, in parallel layers.
        assert r["plain_tensors"] and r["weight_shape"][0] == r["expected_rows"] < r["full_shape"][0], r
        assert set(r["classes"]) <= {"ColumnParallelLinear", "RowParallelLinear"}, r
