"""ControlNet context parallelism: the ControlNet and the transformer it feeds, split the same way.

Each case compares against the same seeded models in one process (computed on every rank before enabling), checks
that the ControlNet visibly changes the output (so a wrongly split residual could not hide), and that detach
restores bit-for-bit results with no hook left behind.
"""
import pytest
from tolerances import BITWISE, CONTROLNET_FP32, PIPELINE_FP32

from diffpar.testing.probes import assert_split


def assert_both_split(results, config, mode=None):
    """The transformer and the ControlNet each ran every forward on a shard, with their collectives.

    Z-Image Union 2.0 (`mode="control_layers"`) first refines its condition with the control layers over the
    whole image on every rank, then runs them split: every other call of its first attention is whole by design.
    """
    assert_split(results, config)
    calls = len(results[0]["split_controlnet_reference"]["tokens"])
    whole = range(0, calls, 2) if mode == "control_layers" else ()
    assert_split(results, config, key="split_controlnet", whole_calls=whole)


def skip_what_this_release_lacks(family: str, config: dict) -> None:
    """Cases need features that appeared over diffusers releases; on older ones they are refused (tested elsewhere)."""
    import diffusers

    from diffpar.compat.diffusers_cp import cp_config_fields, supports_ulysses_and_ring

    classes = {"zimage": "ZImageControlNetModel", "qwenimage": "QwenImageControlNetModel"}
    if family in classes and not hasattr(diffusers, classes[family]):
        pytest.skip(f"diffusers {diffusers.__version__} has no {classes[family]}")
    for option in ("ulysses_anything", "ring_anything"):
        if config.get(option) and option not in cp_config_fields():
            pytest.skip(f"diffusers {diffusers.__version__} has no {option}")
    if config.get("ulysses_size", 1) > 1 and config.get("ring_size", 1) > 1 and not supports_ulysses_and_ring():
        pytest.skip(f"diffusers {diffusers.__version__} cannot combine Ulysses and Ring")

# (family, world, config, seq, text, pair overrides)
PAIRS = [
    pytest.param("flux", 2, {"ulysses_size": 2}, 16, 8, {}, id="flux-w2-ulysses"),
    pytest.param("flux", 2, {"ring_size": 2}, 16, 8, {}, id="flux-w2-ring"),
    pytest.param("flux", 4, {"ulysses_size": 4}, 16, 8, {"heads": 4}, id="flux-w4-ulysses"),
    pytest.param("flux", 4, {"ulysses_size": 2, "ring_size": 2}, 16, 8, {}, id="flux-w4-ulysses2xring2"),
    pytest.param("flux", 2, {"ulysses_size": 2, "ulysses_anything": True}, 15, 7, {}, id="flux-w2-anything-odd"),
    pytest.param("flux", 4, {"ring_size": 4, "ring_anything": True}, 17, 7, {}, id="flux-w4-ring-anything-odd"),
    pytest.param("flux", 2, {"ulysses_size": 2}, 16, 8, {"nets": 2}, id="flux-multi-w2"),
    pytest.param("flux", 4, {"ulysses_size": 4}, 16, 8, {"nets": 3, "heads": 4}, id="flux-multi3-w4"),
    pytest.param("flux", 2, {"ulysses_size": 2, "ulysses_anything": True}, 16, 8, {"union": True}, id="flux-union-w2"),
    pytest.param("flux", 4, {"ring_size": 4, "ring_anything": True}, 16, 7, {"union": True, "multi": True},
                 id="flux-union-multi-w4-ring"),
    pytest.param("flux", 2, {"ulysses_size": 2}, 16, 8, {"hint": True}, id="flux-image-hint-w2"),
    pytest.param("qwenimage", 2, {"ulysses_size": 2}, 16, 8, {}, id="qwen-w2-ulysses"),
    pytest.param("qwenimage", 4, {"ulysses_size": 4}, 16, 8, {"heads": 4}, id="qwen-w4-ulysses"),
    pytest.param("qwenimage", 4, {"ring_size": 4}, 16, 8, {}, id="qwen-w4-ring"),
    pytest.param("qwenimage", 2, {"ulysses_size": 2, "ulysses_anything": True}, 15, 7, {}, id="qwen-w2-anything-odd"),
    pytest.param("qwenimage", 2, {"ulysses_size": 2}, 16, 8, {"multi": True}, id="qwen-multi-w2"),
    pytest.param("sd3", 2, {"ulysses_size": 2}, 16, 8, {}, id="sd3-w2-ulysses"),
    pytest.param("sd3", 4, {"ring_size": 4}, 16, 8, {"nets": 2}, id="sd3-multi-w4-ring"),
    pytest.param("sd3", 4, {"ulysses_size": 4, "ulysses_anything": True}, 15, 7, {"heads": 4},
                 id="sd3-w4-anything-odd"),
    pytest.param("sd3", 2, {"ulysses_size": 2}, 16, 8, {"no_prompt_stream": True}, id="sd35-large-style-w2"),
    pytest.param("zimage", 2, {"ulysses_size": 2}, 16, 8, {}, id="zimage-union1-w2"),
    pytest.param("zimage", 4, {"ulysses_size": 4}, 16, 8, {"heads": 4, "mode": "control_layers"},
                 id="zimage-union2.0-w4"),
    pytest.param("zimage", 2, {"ring_size": 2}, 16, 8, {"mode": "control_noise_refiner"}, id="zimage-union2.1-w2-ring"),
    pytest.param("zimage", 4, {"ulysses_size": 2, "ring_size": 2}, 16, 8, {"mode": "control_noise_refiner"},
                 id="zimage-union2.1-w4-ulysses2xring2"),
]


@pytest.mark.parametrize("family,world,config,seq,text,pair_kwargs", PAIRS)
def test_controlnet_pair_matches_one_process(ranks, family, world, config, seq, text, pair_kwargs):
    skip_what_this_release_lacks(family, config)
    results = ranks(world, "workers.controlnet:pair_equivalence", family=family, config=config, seq=seq, text=text,
                    pair_kwargs=pair_kwargs)
    for r in results:
        assert r["diff"] <= CONTROLNET_FP32, (r["rank"], r["diff"])
        assert r["controlnet_effect"] > 1e-2, "the ControlNet must change the output for this test to mean anything"
        assert r["detach_diff"] == BITWISE and r["detached_clean"]
        assert any("ControlNet plan" in s for s in r["steps"])
    assert_both_split(results, config, (pair_kwargs or {}).get("mode"))


def test_padded_prompt_mask_reaches_controlnet_blocks(ranks):
    from diffusers import QwenImageTransformer2DModel

    from diffpar.compat.diffusers_cp import leaves_text_mask_whole
    from diffpar.compat.diffusers_cp_hooks import native_cp_plan
    from diffpar.testing import RankFailure, tiny_transformers

    if leaves_text_mask_whole(tiny_transformers.build("qwenimage")[0], native_cp_plan(QwenImageTransformer2DModel)):
        # 0.37.x/0.38 keep the prompt mask whole while splitting the prompt: refused, not a wrong image.
        with pytest.raises(RankFailure, match="padded prompt under context parallelism"):
            ranks(2, "workers.controlnet:pair_equivalence", family="qwenimage", config={"ulysses_size": 2},
                  input_kwargs={"masked_text": 3})
        return
    results = ranks(2, "workers.controlnet:pair_equivalence", family="qwenimage", config={"ulysses_size": 2},
                    input_kwargs={"masked_text": 3})
    assert all(r["diff"] <= CONTROLNET_FP32 for r in results), [r["diff"] for r in results]
    assert_both_split(results, {"ulysses_size": 2})


@pytest.mark.parametrize("family,world,config", [
    pytest.param("flux", 4, {"ulysses_size": 2, "tp_size": 2}, id="flux-w4-ulysses2xtp2"),
    pytest.param("flux", 4, {"ring_size": 2, "tp_size": 2}, id="flux-w4-ring2xtp2"),
    pytest.param("qwenimage", 4, {"ulysses_size": 2, "tp_size": 2}, id="qwen-w4-ulysses2xtp2"),
    pytest.param("zimage", 4, {"ulysses_size": 2, "tp_size": 2}, id="zimage-w4-ulysses2xtp2"),
])
def test_controlnet_with_hybrid_transformer(ranks, family, world, config):
    skip_what_this_release_lacks(family, config)
    """Transformer on ulysses/ring x tp; the ControlNet context parallel on the same ring x ulysses sub-mesh, and
    tensor parallel on the same tp ranks where its blocks have a plan (Flux, Qwen-Image; Z-Image's stays whole)."""
    results = ranks(world, "workers.controlnet:pair_equivalence", family=family, config=config,
                    pair_kwargs={"heads": 4})
    for r in results:
        assert r["diff"] <= CONTROLNET_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == BITWISE
        if family == "zimage":  # no TP plan of its own; only the refiners it shares with the transformer shrink
            assert 0.5 < r["controlnet_bytes_ratio"] <= 1.0, r["controlnet_bytes_ratio"]
        else:
            assert r["controlnet_bytes_ratio"] < 0.75, r["controlnet_bytes_ratio"]  # its blocks split over tp 2
    assert_both_split(results, config)  # the tp ranks of one sequence shard hold the same tokens


@pytest.mark.parametrize("family,world,config", [
    pytest.param("flux", 2, {"tp_size": 2}, id="flux-w2-tp2"),
    pytest.param("flux", 4, {"tp_size": 4}, id="flux-w4-tp4"),
    pytest.param("qwenimage", 2, {"tp_size": 2}, id="qwen-w2-tp2"),
])
def test_controlnet_tensor_parallel_with_the_transformer(ranks, family, world, config):
    """tp_size alone: the ControlNet's blocks are sharded by the same engine and plan as its transformer's."""
    skip_what_this_release_lacks(family, config)
    results = ranks(world, "workers.controlnet:pair_equivalence", family=family, config=config,
                    pair_kwargs={"heads": 4})
    for r in results:
        assert r["diff"] <= CONTROLNET_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == BITWISE
        assert r["controlnet_effect"] > 1e-2
        assert r["controlnet_bytes_ratio"] < 1.5 / config["tp_size"], r["controlnet_bytes_ratio"]
    assert_both_split(results, config)  # whole tokens, all-reduces in every attention call of both


# -- whole pipelines ----------------------------------------------------------------------------------------------

PIPELINES = [
    pytest.param("flux", 2, {"ulysses_size": 2}, {}, {}, id="flux-w2-ulysses"),
    pytest.param("flux", 4, {"ulysses_size": 2, "ring_size": 2}, {"nets": 2}, {}, id="flux-multi-w4-ulysses2xring2"),
    pytest.param("flux", 2, {"ulysses_size": 2, "ulysses_anything": True}, {"union": True}, {"width": 40},
                 id="flux-union-w2-anything"),
    pytest.param("qwenimage", 2, {"ulysses_size": 2}, {}, {}, id="qwen-w2-ulysses"),
    pytest.param("qwenimage", 4, {"ulysses_size": 4}, {"multi": True}, {"masked_text": 2}, id="qwen-multi-w4"),
    pytest.param("sd3", 2, {"ulysses_size": 2}, {}, {}, id="sd3-cfg-w2-ulysses"),
    pytest.param("sd3", 4, {"ulysses_size": 2, "ring_size": 2}, {"nets": 2}, {}, id="sd3-multi-w4-ulysses2xring2"),
    pytest.param("zimage", 2, {"ulysses_size": 2}, {"mode": "control_noise_refiner"}, {}, id="zimage-2.1-cfg-w2"),
    pytest.param("zimage", 4, {"ulysses_size": 4}, {"mode": "control_layers"}, {"width": 48}, id="zimage-2.0-cfg-w4"),
]


@pytest.mark.parametrize("family,world,config,builder_kwargs,call_kwargs", PIPELINES)
def test_controlnet_pipeline_matches_one_process(ranks, family, world, config, builder_kwargs, call_kwargs):
    skip_what_this_release_lacks(family, config)
    results = ranks(world, "workers.controlnet:pipeline_equivalence", family=family, config=config,
                    builder_kwargs=builder_kwargs, call_kwargs=call_kwargs, timeout=300)
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == BITWISE
    assert_both_split(results, config, builder_kwargs.get("mode"))


def test_ranks_with_different_global_rng_still_agree(ranks):
    """SD3's pipeline samples the control latent from the global RNG; diffpar broadcasts rank 0's condition."""
    results = ranks(2, "workers.controlnet:pipeline_equivalence", family="sd3", config={"ulysses_size": 2},
                    unsynced_global_rng=True, timeout=300)
    assert all(r["diff"] <= PIPELINE_FP32 for r in results), [r["diff"] for r in results]
    assert_both_split(results, {"ulysses_size": 2})


# -- errors ---------------------------------------------------------------------------------------------------


def test_controlnet_without_context_parallel_or_a_tp_plan_is_refused(ranks):
    skip_what_this_release_lacks("zimage", {})
    messages = ranks(2, "workers.controlnet:expect_error", family="zimage", config={"tp_size": 2},
                     pair_kwargs={"heads": 4})
    for m in messages:
        assert m is not None and "needs ulysses_size or ring_size" in m and "remove the ControlNet" in m
        assert "no tensor-parallel plan for ['ZImageControlNetModel']" in m


def test_union_prompt_that_does_not_split_evenly_says_what_to_do(ranks):
    # The mode token makes the prompt 9 tokens: not splittable in 2 equal parts.
    messages = ranks(2, "workers.controlnet:expect_error", family="flux", config={"ulysses_size": 2},
                     pair_kwargs={"union": True}, text=8, run_step=True)
    for m in messages:
        assert m is not None and "not divisible by 2" in m and "ulysses_anything=True" in m


def test_controlnet_heads_not_divisible_by_ulysses_is_refused(ranks):
    messages = ranks(4, "workers.controlnet:expect_error", family="qwenimage", config={"ulysses_size": 4},
                     pair_kwargs={"heads": 2})
    for m in messages:
        assert m is not None and "does not divide the 2 attention heads" in m


def test_unlisted_controlnet_is_named_before_any_collective():
    """The local check api.py can run (no collective): a context-parallel transformer with an unlisted ControlNet."""
    from workers.controlnet import unlisted_controlnet_check

    message = unlisted_controlnet_check("flux", {"ulysses_size": 2})
    assert message is not None and "not in extra_parallel_modules" in message and "pipe.controlnet" in message
    assert unlisted_controlnet_check("flux", {"ulysses_size": 2}, listed=("controlnet",)) is None
    assert unlisted_controlnet_check("flux", {"tp_size": 2}) is None
