"""diffpar's own context-parallel plans (Z-Image, SD3, HunyuanVideo) vs the same seeded model in one process."""
import inspect

import pytest
from tolerances import CP_FP32

from diffpar.families.transformers.hunyuan_video import context_parallel_attention_takes_masks
from diffpar.compat import diffusers_cp
from diffpar.testing.probes import assert_split, split_problems

pytestmark = pytest.mark.compat  # also runs in CI's diffusers 0.36.0 leg

MODELS = ["zimage", "sd3", "hunyuan_video"]

# Default inputs split evenly over 2 and 4 ranks (Z-Image pads every sequence to a multiple of 32 itself).
# "Odd" inputs: token counts no degree divides. Z-Image's padded lengths are always even, so its odd case is the
# head count (Ulysses-anything gives ranks unequal heads).
ODD_INPUTS = {
    "zimage": {"seq": 24, "text": 7},
    "sd3": {"seq": 15, "text": 7},
    "hunyuan_video": {"seq": 15, "frames": 3, "text": 9, "valid": [7]},  # 7 real text tokens of 9
}

HAS_ULYSSES_AND_RING = diffusers_cp.supports_ulysses_and_ring()
HAS_ULYSSES_ANYTHING = "ulysses_anything" in diffusers_cp.cp_config_fields()
HAS_RING_ANYTHING = "ring_anything" in diffusers_cp.cp_config_fields()
needs_both = pytest.mark.skipif(not HAS_ULYSSES_AND_RING,
                                reason="this diffusers release cannot combine Ulysses and Ring")
needs_ua = pytest.mark.skipif(not HAS_ULYSSES_ANYTHING, reason="this diffusers release has no ulysses_anything")
needs_ra = pytest.mark.skipif(not HAS_RING_ANYTHING, reason="this diffusers release has no ring_anything")
TAKES_MASKS = context_parallel_attention_takes_masks()
needs_masks = pytest.mark.skipif(not TAKES_MASKS, reason="this diffusers release's CP attention takes no mask")

# (world, config, model overrides, odd inputs?)
LAYOUTS = [
    pytest.param(2, {"ulysses_size": 2}, {}, False, id="w2-ulysses"),
    pytest.param(2, {"ring_size": 2}, {}, False, id="w2-ring"),
    pytest.param(4, {"ulysses_size": 4}, {"heads": 4}, False, id="w4-ulysses"),
    pytest.param(4, {"ring_size": 4}, {}, False, id="w4-ring"),
    pytest.param(4, {"ulysses_size": 2, "ring_size": 2}, {}, False, id="w4-ulysses2xring2", marks=needs_both),
    pytest.param(2, {"ulysses_size": 2, "ulysses_anything": True}, {"heads": 3}, True, id="w2-ulysses-anything-odd",
                 marks=needs_ua),
    pytest.param(4, {"ulysses_size": 4, "ulysses_anything": True}, {"heads": 7}, True, id="w4-ulysses-anything-odd",
                 marks=needs_ua),
    pytest.param(2, {"ring_size": 2, "ring_anything": True}, {}, True, id="w2-ring-anything-odd", marks=needs_ra),
    pytest.param(4, {"ring_size": 4, "ring_anything": True}, {}, True, id="w4-ring-anything-odd", marks=needs_ra),
]


def _check(results, config, model_name, tolerance=CP_FP32):
    for r in results:
        assert r["diff"] <= tolerance, (r["rank"], r["diff"])
        assert r["detach_bitwise"], f"rank {r['rank']}: detach must restore the model bit for bit ({r['detach_diff']})"
    # Every parallel call split the work. HunyuanVideo's plan first cuts the prompt to its real tokens.
    for call in range(len(results[0]["split_calls"])):
        assert_split([{**r, "split": r["split_calls"][call]} for r in results], config,
                     text_cut=model_name == "hunyuan_video")


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("world,config,model_kwargs,odd", LAYOUTS)
def test_plan_matches_one_process(ranks, model_name, world, config, model_kwargs, odd):
    results = ranks(world, "workers.cp_plans_ours:cp_equivalence", model_name=model_name, config=config,
                    model_kwargs=model_kwargs, input_kwargs=ODD_INPUTS[model_name] if odd else {})
    _check(results, config, model_name)


def test_repeated_calls_do_not_drift(ranks):
    """Hooks, processor swaps and the prompt cut stay exact call after call."""
    for name in MODELS:
        results = ranks(2, "workers.cp_plans_ours:cp_equivalence", model_name=name, config={"ulysses_size": 2},
                        calls=3)
        assert all(len(r["split_calls"]) == 3 for r in results)
        _check(results, {"ulysses_size": 2}, name)


def test_split_check_fails_without_parallelism(ranks):
    """The split check bites on the laxest case (HunyuanVideo: unsplit token refiner, cut prompt): the same run
    with enable_cache skipped matches one process exactly and fails it."""
    config = {"ulysses_size": 2}
    results = ranks(2, "workers.cp_plans_ours:cp_equivalence", model_name="hunyuan_video", config=config,
                    input_kwargs={"valid": [5]}, enable=False)
    assert all(r["diff"] == 0.0 for r in results)
    problems = split_problems(results[0]["split_reference"], [r["split"] for r in results], config, text_cut=True)
    assert any("image_tokens per rank [16, 16], expected [8, 8]" in p for p in problems), problems
    assert any("text_tokens per rank [8, 8], expected [4, 4]" in p for p in problems), problems
    assert any("funcol.all_to_all_single issued in 0 of" in p for p in problems), problems


# ---------------------------------------------------------------------------------------------------------------
# Z-Image: per-sample lists, a padding mask when samples differ in length, omni mode.
# ---------------------------------------------------------------------------------------------------------------

UNEQUAL_SAMPLES = {"batch": 2, "sizes": [16, 40], "texts": [7, 40]}  # 32 + 32 vs 64 + 64 tokens: padding mask


@needs_masks
@pytest.mark.parametrize("world,config,model_kwargs", [
    pytest.param(2, {"ulysses_size": 2}, {}, id="w2-ulysses"),
    pytest.param(4, {"ulysses_size": 4}, {"heads": 4}, id="w4-ulysses"),
])
def test_zimage_samples_of_different_lengths(ranks, world, config, model_kwargs):
    """The padding mask stays whole: after Ulysses' all-to-all each rank sees every key in the original order."""
    _check(ranks(world, "workers.cp_plans_ours:cp_equivalence", model_name="zimage", config=config,
                 model_kwargs=model_kwargs, input_kwargs=UNEQUAL_SAMPLES), config, "zimage")


def test_zimage_samples_of_different_lengths_under_ring_are_refused_on_every_rank(ranks):
    results = ranks(2, "workers.cp_plans_ours:cp_forward_error", model_name="zimage", config={"ring_size": 2},
                    input_kwargs=UNEQUAL_SAMPLES)
    for r in results:
        assert r["type"] == "UnsupportedError", r
        if TAKES_MASKS:
            assert "ring attention with a padding attention mask" in r["message"] and "ulysses_size" in r["message"]
        else:  # refused earlier, by the processor: this release cannot mask under any kind of CP
            assert "differ in length" in r["message"] and "separate calls" in r["message"]


@pytest.mark.skipif(TAKES_MASKS, reason="only releases whose CP attention takes no mask (0.36) refuse this")
def test_zimage_samples_of_different_lengths_are_refused_where_cp_takes_no_mask(ranks):
    results = ranks(2, "workers.cp_plans_ours:cp_forward_error", model_name="zimage", config={"ulysses_size": 2},
                    input_kwargs=UNEQUAL_SAMPLES)
    for r in results:
        assert r["type"] == "UnsupportedError", r
        assert "differ in length" in r["message"] and "separate calls" in r["message"]


def _zimage_has_omni():
    from diffusers import ZImageTransformer2DModel

    return "siglip_feat_dim" in inspect.signature(ZImageTransformer2DModel.__init__).parameters


@pytest.mark.skipif(not _zimage_has_omni(), reason="this diffusers release has no Z-Image omni mode")
@pytest.mark.parametrize("world,config,model_kwargs", [
    pytest.param(2, {"ulysses_size": 2}, {}, id="w2-ulysses"),
    pytest.param(4, {"ulysses_size": 2, "ring_size": 2}, {"layers": 1, "refiner_layers": 2}, id="w4-ulysses2xring2",
                 marks=needs_both),
])
def test_zimage_omni_mode(ranks, world, config, model_kwargs):
    """Condition images, SigLIP tokens and per-token noise masks: the noise mask is split with the sequence."""
    _check(ranks(world, "workers.cp_plans_ours:cp_equivalence", model_name="zimage", config=config,
                 model_kwargs={"omni": True, **model_kwargs}), config, "zimage")


# ---------------------------------------------------------------------------------------------------------------
# SD3: processor swap.
# ---------------------------------------------------------------------------------------------------------------


def test_sd3_2d_latent_and_sd3_0_blocks(ranks):
    """A real 2-D latent (3 x 5 patches, odd) through the cropped positional embedding; SD3.0 (no dual attention)."""
    if not HAS_ULYSSES_ANYTHING:
        pytest.skip("this diffusers release has no ulysses_anything")
    config = {"ulysses_size": 2, "ulysses_anything": True}
    _check(ranks(2, "workers.cp_plans_ours:cp_equivalence", model_name="sd3", config=config,
                 model_kwargs={"dual_layers": ()}, input_kwargs={"seq": 15, "height": 3, "text": 7}), config, "sd3")


def test_sd3_unknown_processor_is_refused_before_anything_changes(ranks):
    results = ranks(2, "workers.cp_plans_ours:cp_enable_error", model_name="sd3", config={"ulysses_size": 2},
                    mutate="sd3_unknown_processor")
    for r in results:
        assert r["type"] == "UnsupportedError", r
        assert "transformer_blocks.0.attn: AttnProcessor2_0" in r["message"]
        assert "no context-parallel version" in r["message"] and "before enable_cache" in r["message"]
        assert r["untouched"], "a refused enable_cache must leave every processor as it was"


# ---------------------------------------------------------------------------------------------------------------
# HunyuanVideo: prompt padding, mask layout, refusals.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world,config,model_kwargs,input_kwargs", [
    # 5 real tokens of 8: cut to 6 (a multiple of 2), one padded token left for the processor to lay out.
    pytest.param(2, {"ulysses_size": 2}, {}, {"valid": [5]}, id="w2-ulysses-cut-and-pad", marks=needs_masks),
    # Left padding cannot be cut: the whole mask is reordered to Ulysses' key order.
    pytest.param(2, {"ulysses_size": 2}, {}, {"valid": [5, 3], "batch": 2, "padding": "left"},
                 id="w2-ulysses-left-padding", marks=needs_masks),
    # Padding spread over several ranks' text shards.
    pytest.param(4, {"ulysses_size": 4}, {"heads": 4}, {"valid": [5, 3], "batch": 2}, id="w4-ulysses-rows-differ",
                 marks=needs_masks),
    # Where CP attention takes no mask (0.36), plain Ulysses cuts to exactly the real tokens, like the ring.
    pytest.param(2, {"ulysses_size": 2}, {}, {"valid": [6]}, id="w2-ulysses-cut"),
    # Ring: cut to exactly the real tokens (6 splits evenly over 2), no mask left.
    pytest.param(2, {"ring_size": 2}, {}, {"valid": [6]}, id="w2-ring-cut"),
    # 5 real tokens over 2 ring ranks, no flag: the call takes the uneven ring by itself.
    pytest.param(2, {"ring_size": 2}, {}, {"valid": [5]}, id="w2-ring-uneven-prompt-by-default", marks=needs_ra),
    pytest.param(4, {"ulysses_size": 2, "ring_size": 2}, {}, {"valid": [4, 4], "batch": 2}, id="w4-both-cut",
                 marks=needs_both),
    pytest.param(4, {"ring_size": 4, "ring_anything": True}, {}, {"valid": [5]}, id="w4-ring-anything-cut",
                 marks=needs_ra),
    pytest.param(2, {"ulysses_size": 2, "ulysses_anything": True}, {}, {"valid": [3, 3], "batch": 2},
                 id="w2-ulysses-anything-cut", marks=needs_ua),
])
def test_hunyuan_video_padded_prompts(ranks, world, config, model_kwargs, input_kwargs):
    _check(ranks(world, "workers.cp_plans_ours:cp_equivalence", model_name="hunyuan_video", config=config,
                 model_kwargs=model_kwargs, input_kwargs=input_kwargs), config, "hunyuan_video")


@pytest.mark.parametrize("config,input_kwargs,expected", [
    pytest.param({"ring_size": 2}, {"valid": [5, 3], "batch": 2},
                 ["[3, 5] real text tokens", "ring attention cannot apply one across ranks", "separate calls"],
                 id="ring-rows-differ"),
    # Only where the release has no uneven ring (< 0.38); from 0.38 it runs (w2-ring-uneven-prompt-by-default).
    pytest.param({"ring_size": 2}, {"valid": [5]},
                 ["5 real text tokens", "cannot split evenly", "set ring_anything=True"], id="ring-uneven-prompt",
                 marks=pytest.mark.skipif(HAS_RING_ANYTHING, reason="0.38+ splits the ring unevenly by itself")),
    pytest.param({"ring_size": 2}, {"valid": [5], "padding": "left"},
                 ["not all at the start", "cannot apply one across ranks"], id="ring-left-padding"),
    pytest.param({"ulysses_size": 2}, {"valid": [5, 3], "batch": 2},
                 ["[3, 5] real text tokens", "upgrade diffusers (0.37+ takes masks)"], id="no-cp-masks-rows-differ",
                 marks=pytest.mark.skipif(TAKES_MASKS, reason="only where CP attention takes no mask (0.36)")),
])
def test_hunyuan_video_prompts_the_ring_cannot_mask_are_refused_on_every_rank(ranks, config, input_kwargs, expected):
    results = ranks(2, "workers.cp_plans_ours:cp_forward_error", model_name="hunyuan_video", config=config,
                    input_kwargs=input_kwargs)
    for r in results:
        assert r["type"] == "UnsupportedError", r
        for part in expected:
            assert part in r["message"], (part, r["message"])


# SD3's own processor takes no backend (it calls SDPA itself); its replacement uses diffusers' active one.
@pytest.mark.parametrize("model_name", ["zimage", "hunyuan_video"])
def test_attention_backend_survives_the_processor_swap(ranks, model_name):
    for r in ranks(2, "workers.cp_plans_ours:backend_survives_processor_swap", model_name=model_name):
        assert r["backends"] == ["native"], r
        assert all("ContextParallel" in name for name in r["processors"]), r


def test_detach_leaves_no_hook_patch_or_processor_behind(ranks):
    results = ranks(2, "workers.cp_plans_ours:leftovers_after_detach", model_names=MODELS)
    for r in results:
        assert r["leftovers"] == {name: [] for name in MODELS}, r
