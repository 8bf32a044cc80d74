"""The default config runs any input: lengths the degree does not divide take diffusers' uneven path by themselves
(0.37+ Ulysses, 0.38+ Ring), with no `*_anything` flag; where the release has none (0.36, Ulysses x Ring) every
rank refuses clearly, naming the dimension and where its length comes from. And bare models called the default
way (`return_dict=True`) give diffusers' output object, gathered like the tuple."""
import pytest
from tolerances import CP_FP32

from diffpar.compat import diffusers_cp
from diffpar.testing.probes import assert_split, expected_shards

pytestmark = pytest.mark.compat  # also runs in CI's diffusers 0.36.0 leg

NATIVE = ["flux", "flux2", "qwenimage", "wan"]
OURS = ["zimage", "sd3", "hunyuan_video"]

# (world, config, heads, seq, text, batch): every length odd for the degree; Wan's text is not split (0.37+), so
# its video tokens are (frames = 1 keeps seq exact; see test_frames for frames > 1).
NATIVE_LAYOUTS = [
    pytest.param(2, {"ulysses_size": 2}, 2, 15, 7, 1, id="w2-ulysses"),
    pytest.param(2, {"ring_size": 2}, 2, 13, 5, 2, id="w2-ring-batch2"),
    pytest.param(3, {"ulysses_size": 3}, 3, 16, 7, 2, id="w3-ulysses-batch2"),
    pytest.param(3, {"ring_size": 3}, 2, 14, 5, 1, id="w3-ring"),
    pytest.param(4, {"ulysses_size": 4}, 4, 13, 5, 1, id="w4-ulysses"),
    pytest.param(4, {"ring_size": 4}, 2, 17, 7, 1, id="w4-ring"),
]


def _uneven_option(config):
    return diffusers_cp.uneven_split_option(config.get("ulysses_size", 1), config.get("ring_size", 1))


def _assert_refused(results, world, kinds):
    assert len(results) == world
    for r in results:
        assert r["type"] == "DiffparError", r
        assert f"must be split over {world} ranks" in r["message"], r["message"]
        assert any(k in r["message"] for k in kinds), (kinds, r["message"])
        assert "The length comes from" in r["message"], r["message"]


def _assert_uneven_shares(results, reference, world):
    """Each rank's share of every split stream: one process's length cut as tensor_split cuts it."""
    for stream in ("image_tokens", "text_tokens"):
        full = reference[stream][0]
        seen = sorted(r["split"][stream][0] for r in results)
        if full and seen != [full] * world:
            assert seen == sorted(expected_shards(full, world)), (stream, seen, full)


@pytest.mark.parametrize("model_name", NATIVE)
@pytest.mark.parametrize("world,config,heads,seq,text,batch", NATIVE_LAYOUTS)
def test_native_plans_run_odd_lengths_by_default(ranks, model_name, world, config, heads, seq, text, batch):
    model_kwargs = {"heads": heads}
    input_kwargs = {"frames": 1} if model_name == "wan" else {}
    if _uneven_option(config) is None:
        results = ranks(world, "workers.cp_plans_ours:cp_forward_error", model_name=model_name, config=config,
                        model_kwargs=model_kwargs, input_kwargs={"seq": seq, "text": text, "batch": batch,
                                                                 **input_kwargs})
        _assert_refused(results, world, ["image tokens", "video tokens", "text tokens"])
        return
    results = ranks(world, "workers.cp_transformers:cp_equivalence", model_name=model_name, config=config, seq=seq,
                    text=text, batch=batch, model_kwargs=model_kwargs, input_kwargs=input_kwargs)
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)
    _assert_uneven_shares(results, results[0]["split_reference"], world)
    assert sorted(r["split"]["image_tokens"][0] for r in results) != [seq // world] * world  # really uneven


# Ours: Z-Image pads every sequence to a multiple of 32 (odd only for 3 ranks); SD3 and HunyuanVideo odd for all.
OURS_INPUTS = {
    "zimage": {"seq": 24, "text": 7},
    "sd3": {"seq": 15, "text": 7},
    # 7 real text tokens of 9; 15 video tokens over 3 frames. Plain Ulysses keeps a padded text token (masked).
    "hunyuan_video": {"seq": 15, "frames": 3, "text": 9, "valid": [7]},
}
OURS_LAYOUTS = [
    pytest.param(2, {"ulysses_size": 2}, 2, id="w2-ulysses"),
    pytest.param(3, {"ulysses_size": 3}, 3, id="w3-ulysses"),
    pytest.param(3, {"ring_size": 3}, 2, id="w3-ring"),
    pytest.param(4, {"ulysses_size": 4}, 4, id="w4-ulysses"),
    pytest.param(4, {"ring_size": 4}, 2, id="w4-ring"),
]


@pytest.mark.parametrize("model_name", OURS)
@pytest.mark.parametrize("world,config,heads", OURS_LAYOUTS)
def test_our_plans_run_odd_lengths_by_default(ranks, model_name, world, config, heads):
    inputs = OURS_INPUTS[model_name]
    if _uneven_option(config) is None and not (model_name == "zimage" and world != 3):
        results = ranks(world, "workers.cp_plans_ours:cp_forward_error", model_name=model_name, config=config,
                        model_kwargs={"heads": heads}, input_kwargs=inputs)
        if model_name != "hunyuan_video":
            _assert_refused(results, world, ["image tokens", "video tokens", "text tokens"])
            return
        # HunyuanVideo's plan trims the prompt to a multiple of the degree where it can (then the call runs and is
        # checked below like any other), else it or the split check refuses, naming text or video tokens.
        if any(r["type"] is not None for r in results):
            for r in results:
                assert r["type"] in ("UnsupportedError", "DiffparError"), r
                assert "text tokens" in r["message"] or "video tokens" in r["message"], r["message"]
            return
    results = ranks(world, "workers.cp_plans_ours:cp_equivalence", model_name=model_name, config=config,
                    model_kwargs={"heads": heads}, input_kwargs=inputs)
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_bitwise"], r["detach_diff"]
    assert_split(results, config, text_cut=model_name == "hunyuan_video")
    _assert_uneven_shares(results, results[0]["split_reference"], world) if model_name != "hunyuan_video" else None


@pytest.mark.parametrize("model_name,input_kwargs", [
    pytest.param("wan", {"seq": 15, "frames": 3}, id="wan-3-frames"),
    pytest.param("hunyuan_video", {"seq": 21, "frames": 3, "text": 8, "valid": [5, 3], "batch": 2},
                 id="hunyuan-3-frames-prompts-differ"),
])
def test_frames(ranks, model_name, input_kwargs):
    """Odd frame counts (3 latent frames of 5 and 7 tokens): the video tokens split unevenly over 2 ranks; for
    HunyuanVideo with a padding mask laid out in the uneven key order."""
    config = {"ulysses_size": 2}
    if _uneven_option(config) is None:
        results = ranks(2, "workers.cp_plans_ours:cp_forward_error", model_name=model_name, config=config,
                        input_kwargs=input_kwargs)
        _assert_refused(results, 2, ["video tokens"])
        return
    if model_name == "hunyuan_video" and not diffusers_cp.context_parallel_attention_takes_masks():
        pytest.skip("this release's CP attention takes no mask")
    results = ranks(2, "workers.cp_plans_ours:cp_equivalence", model_name=model_name, config=config,
                    input_kwargs=input_kwargs)
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
    assert_split(results, config, text_cut=model_name == "hunyuan_video")
    assert sorted(r["split"]["image_tokens"][0] for r in results) == expected_shards(input_kwargs["seq"], 2)[::-1]


@pytest.mark.skipif(not diffusers_cp.supports_ulysses_and_ring(), reason="this release cannot combine them")
def test_ulysses_x_ring_refuses_odd_lengths_naming_the_dimension(ranks):
    results = ranks(4, "workers.cp_plans_ours:cp_forward_error", model_name="flux",
                    config={"ulysses_size": 2, "ring_size": 2}, input_kwargs={"seq": 16, "text": 7})
    _assert_refused(results, 4, ["7 text tokens"])
    for r in results:
        assert "Ulysses and Ring together split only evenly" in r["message"]
        assert "prompt's token count" in r["message"] and "image size" not in r["message"]


@pytest.mark.skipif(not diffusers_cp.supports_ulysses_and_ring(), reason="this release cannot combine them")
def test_ulysses_x_ring_refusal_on_a_video_model_names_video_tokens(ranks):
    """AnyFlow (Wan 2.1 blocks, diffpar's plan) at Ulysses 2 x Ring 2 with 17 video tokens: the refusal names the
    model and the plan key (diffusers' hooks sit on a block, whose class said neither), and counts video tokens
    (frames x height x width patches), not image tokens."""
    from diffpar.testing.coverage import class_available

    if not class_available("AnyFlowTransformer3DModel"):
        pytest.skip("this diffusers release has no AnyFlowTransformer3DModel")
    results = ranks(4, "workers.cp_plans_ours:cp_forward_error", model_name="anyflow",
                    config={"ulysses_size": 2, "ring_size": 2}, model_kwargs={"heads": 4},
                    input_kwargs={"seq": 17, "text": 7})
    _assert_refused(results, 4, ["17 video tokens"])
    for r in results:
        message = r["message"]
        assert "context parallelism on AnyFlowTransformer3DModel" in message, message
        assert "of 'blocks." in message, message
        assert "latent frames x height x width patches" in message, message
        assert "image tokens" not in message and "image size" not in message, message


def test_every_planned_model_names_its_own_token_kind():
    """What a split refusal counts (video, audio or image tokens) is the family's kind for every model case with a
    context-parallel plan: the family's `tokens`, else the class name (JoyImage's "3D" image models and
    StableAudio3DiT are where the name alone would mislead)."""
    import diffusers

    from diffpar.families.registry import split_token_kind
    from diffpar.testing.coverage import all_cases, class_available

    checked = 0
    for case in all_cases():
        if not case.cp or case.refused or not class_available(case.class_name):
            continue
        cls = getattr(diffusers, case.class_name)
        kind, source = diffusers_cp.describe_split_dimension(case.class_name, "blocks.0", "Block", "hidden_states",
                                                             split_token_kind(cls))
        assert kind == f"{case.kind} tokens", (case.class_name, case.kind, kind)
        checked += 1
    assert checked >= 5, checked  # at least the first families, on every release
    video, _ = diffusers_cp.describe_split_dimension("AnyFlowTransformer3DModel", "blocks.0", "Block",
                                                     "hidden_states", "video")
    assert video == "video tokens"


def test_fewer_tokens_than_ranks_is_refused_naming_the_prompt(ranks):
    """1 text token on 4 ranks: no split gives every rank one (diffusers' own answer is a bare AssertionError)."""
    results = ranks(4, "workers.cp_plans_ours:cp_forward_error", model_name="qwenimage",
                    config={"ulysses_size": 4}, model_kwargs={"heads": 4}, input_kwargs={"seq": 16, "text": 1})
    kinds = ["1 text tokens"]
    _assert_refused(results, 4, kinds)
    for r in results:
        assert "prompt's token count" in r["message"], r["message"]


def test_odd_prompt_on_qwenimage_names_the_text_not_the_image(ranks):
    """The issue's case: QwenImage's text RoPE table (17 rows) at ulysses 2 runs where the release can split
    unevenly; elsewhere the refusal blames the prompt, not the image size."""
    config = {"ulysses_size": 2}
    if _uneven_option(config) is None:
        results = ranks(2, "workers.cp_plans_ours:cp_forward_error", model_name="qwenimage", config=config,
                        input_kwargs={"seq": 16, "text": 17})
        _assert_refused(results, 2, ["17 text tokens"])
        return
    results = ranks(2, "workers.cp_transformers:cp_equivalence", model_name="qwenimage", config=config, seq=16,
                    text=17)
    assert all(r["diff"] <= CP_FP32 for r in results)
    assert sorted(r["split"]["text_tokens"][0] for r in results) == [8, 9]
    assert_split(results, config)


def test_explicit_anything_options_still_work(ranks):
    config = {"ulysses_size": 2, "ulysses_anything": True}
    if _uneven_option(config) is None:
        pytest.skip("this release has no ulysses_anything")
    results = ranks(2, "workers.cp_transformers:cp_equivalence", model_name="flux", config=config, seq=15, text=7)
    assert all(r["diff"] <= CP_FP32 for r in results)
    assert_split(results, config)


# -- return_dict=True ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", NATIVE)
@pytest.mark.parametrize("world,config,heads", [
    pytest.param(2, {"ulysses_size": 2}, 2, id="w2-ulysses"),
    pytest.param(4, {"ulysses_size": 4}, 4, id="w4-ulysses"),
    pytest.param(4, {"ring_size": 4}, 2, id="w4-ring"),
])
def test_native_models_called_with_return_dict(ranks, model_name, world, config, heads):
    results = ranks(world, "workers.cp_transformers:cp_equivalence", model_name=model_name, config=config,
                    model_kwargs={"heads": heads}, return_dict=True)
    for r in results:
        assert r["output_type"].endswith("Transformer2DModelOutput"), r["output_type"]
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)


@pytest.mark.parametrize("model_name", OURS)
@pytest.mark.parametrize("world,config,heads", [
    pytest.param(2, {"ulysses_size": 2}, 2, id="w2-ulysses"),
    pytest.param(4, {"ring_size": 4}, 2, id="w4-ring"),
])
def test_our_models_called_with_return_dict(ranks, model_name, world, config, heads):
    results = ranks(world, "workers.cp_plans_ours:cp_equivalence", model_name=model_name, config=config,
                    model_kwargs={"heads": heads}, return_dict=True)
    for r in results:
        assert r["output_type"].endswith("Transformer2DModelOutput"), r["output_type"]
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_bitwise"]
    assert_split(results, config, text_cut=model_name == "hunyuan_video")
