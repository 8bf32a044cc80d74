"""Inputs the family harness does not vary, for the video families added through it (HunyuanVideo 1.5, Framepack,
Mochi, ...): padded
prompts under context parallelism match one process, with the split proven; what a mode cannot mask is refused on
every rank with the reason. (The harness runs these models on unpadded prompts.)"""
import pytest
import torch
from tolerances import CP_FP32

from diffpar.compat.diffusers_cp import (
    context_parallel_attention_takes_masks,
    supports_ulysses_and_ring,
    uneven_split_option,
)
from diffpar.testing.coverage import class_available
from diffpar.testing.probes import assert_split

TAKES_MASKS = context_parallel_attention_takes_masks()
needs_masks = pytest.mark.skipif(not TAKES_MASKS, reason="this release's CP attention takes no mask")
needs_ring_uneven = pytest.mark.skipif(uneven_split_option(1, 2) is None, reason="no uneven ring on this release")
needs_ulysses_uneven = pytest.mark.skipif(uneven_split_option(2, 1) is None,
                                          reason="no uneven Ulysses on this release")
needs_both = pytest.mark.skipif(not supports_ulysses_and_ring(), reason="no Ulysses x Ring on this release")


def _cosmos25() -> bool:
    import inspect

    import diffusers

    cls = getattr(diffusers, "CosmosTransformer3DModel", None)
    return cls is not None and "img_context_dim_in" in inspect.signature(cls.__init__).parameters


needs_cosmos25 = pytest.mark.skipif(not _cosmos25(), reason="no Cosmos 2.5 image context on this release")


def _require(class_name):
    if not class_available(class_name):
        pytest.skip(f"this diffusers release has no {class_name}")


PADDED = [
    # HunyuanVideo 1.5 text-to-video: the image token is masked out (zero image embeds) and cut before the split.
    pytest.param("hunyuan_video15", "HunyuanVideo15Transformer3DModel", 2, {"ulysses_size": 2},
                 {"image": False, "seq": 16, "text": 9}, id="hv15-t2v-ulysses"),
    pytest.param("hunyuan_video15", "HunyuanVideo15Transformer3DModel", 2, {"ring_size": 2},
                 {"image": False, "valid": [4], "seq": 16}, id="hv15-t2v-padded-ring"),
    pytest.param("hunyuan_video15", "HunyuanVideo15Transformer3DModel", 4, {"ulysses_size": 2, "ring_size": 2},
                 {"image": False, "valid": [6], "seq": 16, "text": 10}, id="hv15-t2v-padded-ulysses2xring2",
                 marks=needs_both),
    # Prompts of different lengths in one batch: a key mask laid out in Ulysses' gather order.
    pytest.param("hunyuan_video15", "HunyuanVideo15Transformer3DModel", 2, {"ulysses_size": 2},
                 {"valid": [5, 2], "batch": 2}, id="hv15-rows-differ-ulysses", marks=needs_masks),
    pytest.param("hunyuan_video15", "HunyuanVideo15Transformer3DModel", 4, {"ulysses_size": 4},
                 {"valid": [5, 2], "batch": 2, "seq": 16}, id="hv15-rows-differ-ulysses4", marks=needs_masks),
    # Framepack with two videos per call: the forward's key mask over [history + video, prompt], in Ulysses' order.
    pytest.param("hunyuan_video_framepack", "HunyuanVideoFramepackTransformer3DModel", 2, {"ulysses_size": 2},
                 {"valid": [6, 3], "batch": 2}, id="framepack-rows-differ-ulysses", marks=needs_masks),
    pytest.param("hunyuan_video_framepack", "HunyuanVideoFramepackTransformer3DModel", 2, {"ring_size": 2},
                 {"valid": [5], "seq": 16}, id="framepack-one-video-padded-ring"),
    # Mochi: the prompt cut to its real tokens (every mode), or a key mask in Ulysses' order for a mixed batch.
    pytest.param("mochi", "MochiTransformer3DModel", 2, {"ring_size": 2}, {"valid": [6], "seq": 16}, id="mochi-padded-ring"),
    pytest.param("mochi", "MochiTransformer3DModel", 4, {"ulysses_size": 2, "ring_size": 2},
                 {"valid": [4, 4], "batch": 2, "seq": 16}, id="mochi-padded-ulysses2xring2", marks=needs_both),
    pytest.param("mochi", "MochiTransformer3DModel", 2, {"ulysses_size": 2}, {"valid": [6, 3], "batch": 2},
                 id="mochi-rows-differ-ulysses", marks=needs_masks),
    pytest.param("mochi", "MochiTransformer3DModel", 4, {"ulysses_size": 4}, {"valid": [7, 2], "batch": 2,
                 "seq": 16}, id="mochi-rows-differ-ulysses4", marks=needs_masks),
]


@pytest.mark.parametrize("builder,class_name,world,config,input_kwargs", PADDED)
def test_padded_prompts_match_one_process(ranks, builder, class_name, world, config, input_kwargs):
    _require(class_name)
    kwargs = dict(input_kwargs)
    batch, seq, text = kwargs.pop("batch", 1), kwargs.pop("seq", 15), kwargs.pop("text", 8)
    results = ranks(world, "workers.cp_transformers:cp_equivalence", model_name=builder, config=config, seq=seq,
                    text=text, batch=batch, model_kwargs={"heads": 4}, input_kwargs=kwargs)
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config, text_cut=True)


REFUSED = [
    pytest.param("hunyuan_video15", "HunyuanVideo15Transformer3DModel", {"ring_size": 2},
                 {"valid": [5, 2], "batch": 2}, ["[5, 8] real text tokens", "ring attention cannot apply one"],
                 id="hv15-ring-rows-differ"),
    pytest.param("hunyuan_video_framepack", "HunyuanVideoFramepackTransformer3DModel", {"ring_size": 2},
                 {"valid": [6, 3], "batch": 2}, ["padding mask", "ring attention", "ulysses_size"],
                 id="framepack-ring-rows-differ", marks=needs_masks),
    pytest.param("mochi", "MochiTransformer3DModel", {"ring_size": 2}, {"valid": [6, 3], "batch": 2},
                 ["[3, 6] real text tokens", "ring attention cannot apply one"], id="mochi-ring-rows-differ"),
    pytest.param("mochi", "MochiTransformer3DModel", {"ulysses_size": 2}, {"valid": [6], "left_pad": True},
                 ["padding before real tokens", "Pad prompts at the end"], id="mochi-left-padding"),
]


def test_mochi_tensor_parallel_slices_the_rope_frequencies_by_heads():
    """Mochi's RoPE frequencies (3 x heads x head_dim/2) follow the heads: each rank keeps its heads along dim 1
    (3 heads on 2 ranks: 2 + 1), and the cos/sin table it computes is exactly its heads' part of the whole one.
    The whole model against one process, per layout, is in tests/test_families.py (case "mochi")."""
    from diffpar.engines.tp_shard import split_heads
    from diffpar.families.transformers import tp_plans
    from diffpar.testing import tiny_transformers

    _require("MochiTransformer3DModel")
    model, _ = tiny_transformers.build("mochi", heads=3)
    plan = tp_plans.shard_plan_for(model, 2)
    (spec,) = plan.head_parameters
    assert (spec.path, spec.name, spec.dim) == ("", "pos_frequencies", 1)
    q_heads = [s.num_q for s in split_heads(3, 3, 2)]
    assert [b - a for (a, b), in spec.ranges] == q_heads == [2, 1]
    # No term mixes heads (einsum "nd,dhf->nhf"); the matmul under it may round the angles (up to a few hundred)
    # in another order for a narrower table, hence one float32 step of such an angle as the tolerance.
    whole_cos, whole_sin = model.rope(model.pos_frequencies, 1, 2, 4, dtype=torch.float32)
    for (a, b), in spec.ranges:
        cos, sin = model.rope(model.pos_frequencies[:, a:b].contiguous(), 1, 2, 4, dtype=torch.float32)
        torch.testing.assert_close(cos, whole_cos[:, a:b], rtol=0, atol=1e-4)
        torch.testing.assert_close(sin, whole_sin[:, a:b], rtol=0, atol=1e-4)
    other, _ = model.rope(model.pos_frequencies[:, 1:3].contiguous(), 1, 2, 4, dtype=torch.float32)
    assert (other - whole_cos[:, 0:2]).abs().max() > 0.1  # another rank's heads: a different table
    by_path = {s.path: s for s in plan.layers}
    last = len(model.transformer_blocks) - 1
    assert by_path["transformer_blocks.0.attn1.to_add_out"].kind == "row"
    assert by_path["transformer_blocks.0.attn1.add_q_proj"].kind == "column"
    assert f"transformer_blocks.{last}.attn1.to_add_out" not in by_path  # context_pre_only: no prompt output
    assert by_path[f"transformer_blocks.{last}.norm1_context.linear_1"].gather_output


def test_mochi_tensor_parallel_shares_of_the_real_configuration():
    """Mochi-1-preview (meta device, bf16): the largest rank's share of the weights at tp 2 / 4, from the plan."""
    import diffusers

    from diffpar.families.transformers import tp_plans
    from diffpar.testing.tiny_models.mochi import REAL_CONFIGS

    _require("MochiTransformer3DModel")
    cls_name, config = REAL_CONFIGS["Mochi-1-preview"]
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    for tp, most in ((2, 0.51), (4, 0.26)):
        acc = tp_plans.shard_plan_for(model, tp).weight_bytes(model, bytes_per_element=2)
        assert acc["per_rank"] / acc["full"] <= most, (tp, acc)


@pytest.mark.parametrize("config", [pytest.param({"tp_size": 2}, id="tp2"),
                                    pytest.param({"ulysses_size": 2, "tp_size": 2}, id="ulysses2xtp2",
                                                 marks=needs_masks)])  # 0.36 refuses the mask under CP
def test_mochi_tensor_parallel_with_prompts_of_different_lengths(ranks, config):
    """Padded prompts (6 and 3 real tokens of 8): diffusers' processor attends per sample over its valid prompt
    tokens; each rank does so for its heads only (half of them), the same as one process."""
    from tolerances import BITWISE, TRANSFORMER_TP_FP32

    _require("MochiTransformer3DModel")
    world = 2 * config.get("ulysses_size", 1)
    results = ranks(world, "workers.transformer_tp:tp_equivalence", model_name="mochi", config=config,
                    seq=16, text=8, batch=2, model_kwargs={"heads": 4, "head_dim": 12},
                    input_kwargs={"valid": [6, 3]})
    for r in results:
        assert r["diff"] <= TRANSFORMER_TP_FP32, (r["rank"], r["diff"])
        assert r["local_heads"]["transformer_blocks.0.attn1"] == 2, "each rank computes half of the 4 heads"
        assert r["bytes_ratio"] < 0.7 and r["plan_bytes_match"]
        assert r["detach_diff"] == BITWISE and r["detach_weights_equal"]


def test_mochi_tensor_parallel_rollback_before_commit_is_local_and_exact(ranks):
    """A later step failing undoes the tensor-parallel step before commit: no collective, every weight (the
    sliced pos_frequencies included: the state dict is compared) back bit for bit."""
    _require("MochiTransformer3DModel")
    for r in ranks(2, "workers.transformer_tp:rollback_before_commit", model_name="mochi",
                   model_kwargs={"heads": 4, "head_dim": 12}):
        assert r["collectives"] == [] and r["same_layers"] and r["restored"], r
        assert r["weight_shape"][0] == r["expected_rows"] < r["full_shape"][0], r  # split before the undo


@pytest.mark.parametrize("builder,class_name,config,input_kwargs,expected", REFUSED)
def test_masks_a_mode_cannot_apply_are_refused_on_every_rank(ranks, builder, class_name, config, input_kwargs,
                                                             expected):
    _require(class_name)
    kwargs = dict(input_kwargs)
    results = ranks(2, "workers.cp_plans_ours:cp_forward_error", model_name=builder, config=config,
                    input_kwargs={"seq": 16, "text": 8, **kwargs})
    for r in results:
        assert r["type"] == "UnsupportedError", r
        for part in expected:
            assert part in r["message"], (part, r["message"])


VARIANTS = [
    # Cosmos 2 video-to-world: a timestep per latent frame makes the modulation per token (split with the tokens).
    pytest.param("cosmos", "CosmosTransformer3DModel", 2, {"ulysses_size": 2}, {}, {"per_frame_timestep": True},
                 15, id="cosmos-per-frame-timestep-ulysses-odd", marks=needs_ulysses_uneven),
    pytest.param("cosmos", "CosmosTransformer3DModel", 4, {"ulysses_size": 2, "ring_size": 2}, {},
                 {"per_frame_timestep": True}, 16, id="cosmos-per-frame-timestep-ulysses2xring2", marks=needs_both),
    # Cosmos 2.5: cross-attention to the prompt and to image-context tokens, both local.
    pytest.param("cosmos", "CosmosTransformer3DModel", 2, {"ring_size": 2}, {"image_context": True}, {}, 16,
                 id="cosmos-image-context-ring", marks=needs_cosmos25),
    # Allegro: the prompt's padding mask applies in the local cross-attention, so every mode takes it.
    pytest.param("allegro", "AllegroTransformer3DModel", 4, {"ring_size": 4, "ring_anything": True}, {},
                 {"prompt_padding": 3}, 17, id="allegro-prompt-padding-ring-anything", marks=needs_ring_uneven),
    pytest.param("allegro", "AllegroTransformer3DModel", 2, {"ulysses_size": 2}, {}, {"prompt_padding": 3}, 16,
                 id="allegro-prompt-padding-ulysses"),
    # Latte with two videos: the temporal blocks' per-patch timestep rows are cut per video.
    pytest.param("latte", "LatteTransformer3DModel", 2, {"ulysses_size": 2}, {}, {"batch": 2}, 15,
                 id="latte-two-videos-ulysses-odd", marks=needs_ulysses_uneven),
    pytest.param("latte", "LatteTransformer3DModel", 4, {"ulysses_size": 2, "ring_size": 2}, {"frames": 3},
                 {"batch": 2}, 16, id="latte-three-frames-two-videos-ulysses2xring2", marks=needs_both),
]


@pytest.mark.parametrize("builder,class_name,world,config,model_kwargs,input_kwargs,seq", VARIANTS)
def test_model_variants_match_one_process(ranks, builder, class_name, world, config, model_kwargs, input_kwargs,
                                          seq):
    _require(class_name)
    input_kwargs = dict(input_kwargs)
    batch = input_kwargs.pop("batch", 1)
    results = ranks(world, "workers.cp_transformers:cp_equivalence", model_name=builder, config=config, seq=seq,
                    text=8, batch=batch, model_kwargs={"heads": 4, **model_kwargs}, input_kwargs=input_kwargs)
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)


TP_VARIANTS = [
    pytest.param("cosmos", "CosmosTransformer3DModel", {"tp_size": 2}, {"image_context": True},
                 {"per_frame_timestep": True}, id="cosmos-2.5-per-frame-tp2", marks=needs_cosmos25),
]


@pytest.mark.parametrize("builder,class_name,config,model_kwargs,input_kwargs", TP_VARIANTS)
def test_model_variants_tensor_parallel_match_one_process(ranks, builder, class_name, config, model_kwargs,
                                                          input_kwargs):
    from tolerances import TRANSFORMER_TP_FP32

    _require(class_name)
    results = ranks(2, "workers.transformer_tp:tp_equivalence", model_name=builder, config=config, seq=15, text=7,
                    model_kwargs={"heads": 4, **model_kwargs}, input_kwargs=input_kwargs)
    for r in results:
        assert r["diff"] <= TRANSFORMER_TP_FP32, (r["rank"], r["diff"])
        assert r["bytes_ratio"] < 0.8 and r["plan_bytes_match"]
        assert r["detach_diff"] == 0.0 and r["detach_weights_equal"]
