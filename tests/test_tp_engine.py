"""The tensor-parallel engine's own checks, independent of any one family."""
import pytest

import diffpar


def test_key_value_heads_fewer_than_ranks_are_held_by_the_ranks_sharing_them():
    """Grouped-query attention (Lumina 2: 4 query heads, 2 key/value heads) at tp 4: each rank computes one query
    head and holds the key/value head it reads (replicated on the two ranks sharing it), as text encoders do.
    Multi-rank equivalence: tests/test_families.py (lumina2-w4-tp)."""
    from diffpar.families.transformers import tp_plans
    from diffpar.testing import tiny_transformers

    model, _ = tiny_transformers.build("lumina2", heads=4, kv_heads=2)
    plan = tp_plans.shard_plan_for(model, 4)
    layers = {s.path: s.ranges for s in plan.layers}
    head_dim = model.layers[0].attn.inner_dim // 4
    assert layers["layers.0.attn.to_q"] == tuple(((h * head_dim, (h + 1) * head_dim),) for h in range(4))
    assert layers["layers.0.attn.to_k"] == tuple(((k * head_dim, (k + 1) * head_dim),) for k in (0, 0, 1, 1))
    assert plan.heads["layers.0.attn"] == [(1, 1)] * 4


def test_fewer_query_heads_than_ranks_refused_on_every_rank(ranks):
    messages = ranks(4, "workers.transformer_tp:expect_error", model_name="lumina2", config={"tp_size": 4},
                     model_kwargs={"heads": 2, "kv_heads": 1})
    assert len(messages) == 4
    assert all(m and "is more than the 2 attention heads" in m and "largest tp_size that works for this model is 2"
               in m for m in messages), messages


def _real_config_ratio(module: str, label: str, tp: int) -> float:
    """The largest rank's share of the weights of a real configuration (meta device, bf16), from the plan."""
    import importlib

    import diffusers
    import torch

    from diffpar.families.transformers import tp_plans

    cls_name, config = importlib.import_module(f"diffpar.testing.tiny_models.{module}").REAL_CONFIGS[label]
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    acc = tp_plans.shard_plan_for(model, tp).weight_bytes(model, bytes_per_element=2)
    return acc["per_rank"] / acc["full"]


@pytest.mark.parametrize("label", ["LTX-Video 0.9 (2B)", "LTX-2 (19B)"])
def test_rope_attentions_are_split_at_real_configs(label):
    """Attentions whose RoPE table spans the whole inner width are split too (the table is cut to each rank's
    columns), so a rank holds about 1/tp of the weights (before: 0.63 / 0.44 of LTX-Video at tp 2 / 4)."""
    from diffpar.testing.coverage import class_available

    if not class_available("LTX2VideoTransformer3DModel" if "LTX-2" in label else "LTXVideoTransformer3DModel"):
        pytest.skip(f"this diffusers release has no class for {label}")
    assert _real_config_ratio("ltx", label, 2) <= 0.51
    assert _real_config_ratio("ltx", label, 4) <= 0.26


def test_rope_table_cut_to_head_rows_in_the_split_layout(ranks):
    """LTX-2.3's split RoPE layout, (B, heads, T, head_dim / 2): the table is cut by heads, not by columns."""
    from tolerances import BITWISE, TRANSFORMER_TP_FP32

    from diffpar.families.transformers import tp_plans
    from diffpar.testing import tiny_transformers
    from diffpar.testing.coverage import class_available

    if not class_available("LTX2VideoTransformer3DModel"):
        pytest.skip("this diffusers release has no LTX2VideoTransformer3DModel")
    model, _ = tiny_transformers.build("ltx2_video_split_rope", heads=4, rope_type="split")
    plan = tp_plans.shard_plan_for(model, 2)
    assert "transformer_blocks.0.attn1.to_q" in {s.path for s in plan.layers}
    rope = {s.path: s for s in plan.output_slices}["rope"]
    assert rope.dim == 1 and rope.ranges == (((0, 2),), ((2, 4),))  # heads, not columns

    results = ranks(2, "workers.transformer_tp:tp_equivalence", model_name="ltx2_video_split_rope",
                    config={"tp_size": 2}, seq=15, text=7, model_kwargs={"heads": 4, "rope_type": "split"})
    for r in results:
        assert r["diff"] <= TRANSFORMER_TP_FP32, (r["rank"], r["diff"])
        assert r["bytes_ratio"] < 0.8, "each rank must hold a fraction of the block weights"
        assert r["plan_bytes_match"]
        assert r["detach_diff"] == BITWISE and r["detach_weights_equal"]


def test_feed_forward_convolutions_are_split_at_real_config():
    """Sana's GLUMBConv (1x1, depthwise 3x3, 1x1) is split by channels (before: 0.737 of the weights per rank)."""
    assert _real_config_ratio("sana", "Sana-1600M-1024px", 2) <= 0.51


def test_only_pointwise_and_depthwise_convolutions_are_split():
    """A 3x3 convolution mixing channels cannot be split by output channels like a Linear: refused by name."""
    import torch

    from diffpar.engines.tensor_parallel import check_tensor_parallel
    from diffpar.engines.tp_shard import DEPTHWISE, EvenSplitPlan, even_shard_plan

    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 4, 3, padding=1))
    good = even_shard_plan(model, EvenSplitPlan({"0": "colwise", "1": DEPTHWISE, "2": "rowwise"}), 2,
                           source="test", origin="test")
    check_tensor_parallel(model, good)
    assert good.weight_bytes(model)["per_rank"] < good.weight_bytes(model)["full"]
    bad = even_shard_plan(model, EvenSplitPlan({"3": "colwise"}), 2, source="test", origin="test")
    with pytest.raises(diffpar.UnsupportedError, match="3 is a Conv2d"):
        check_tensor_parallel(model, bad)


def test_class_label_tables_are_split_at_real_config():
    """DiT's per-block class-label tables are split along their width, rows all-gathered (before: 0.527)."""
    assert _real_config_ratio("dit", "DiT-XL-2-256", 2) <= 0.51


# -- uneven head counts: whole heads per rank, one more on some ----------------------------------------------


def _assert_uneven_split(results, layer: str, head_dim: int, heads_per_rank: list[int], attention: str):
    """Every rank matches one process, detaches bit for bit, and holds exactly its heads' rows of `layer`."""
    from tolerances import BITWISE, TRANSFORMER_TP_FP32

    assert len(results) == len(heads_per_rank)
    for r in sorted(results, key=lambda r: r["rank"]):
        assert r["diff"] <= TRANSFORMER_TP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == BITWISE and r["detach_weights_equal"], r["rank"]
        expected = heads_per_rank[r["rank"]]
        assert r["local_shapes"][layer][0] == expected * head_dim, (r["rank"], r["local_shapes"][layer])
        assert r["local_heads"][attention] == expected, (r["rank"], r["local_heads"][attention])
    # The plan reports the largest rank's bytes (rank 0 holds one head more).
    assert {r["plan_bytes"] for r in results} == {max(r["sharded_bytes"] for r in results)}
    assert next(r for r in results if r["rank"] == 0)["plan_bytes_match"]
    # The ranks hold different shares: a rank with one head more holds more of the weights.
    ratios = {r["rank"]: r["bytes_ratio"] for r in results}
    assert ratios[0] > ratios[len(results) - 1] and max(ratios.values()) < 0.9, ratios


def test_odd_head_count_at_tp_2(ranks):
    """5 heads on 2 ranks (diffpar's Wan plan): 3 and 2 heads; the out-projection takes the matching inputs."""
    results = ranks(2, "workers.transformer_tp:tp_equivalence", model_name="wan", config={"tp_size": 2},
                    model_kwargs={"heads": 5})
    _assert_uneven_split(results, "blocks.0.attn1.to_q", 16, [3, 2], "blocks.0.attn1")
    for r in results:
        assert r["local_shapes"]["blocks.0.attn1.to_out.0"][1] == [48, 32][r["rank"]]


def test_uneven_heads_on_three_ranks(ranks):
    """4 heads on 3 ranks (Flux, diffusers' plan translated): 2, 1, 1 heads; the single blocks' fused output
    projection takes each rank's attention columns (whole heads) and its MLP columns."""
    results = ranks(3, "workers.transformer_tp:tp_equivalence", model_name="flux", config={"tp_size": 3},
                    model_kwargs={"heads": 4})
    _assert_uneven_split(results, "transformer_blocks.0.attn.to_q", 16, [2, 1, 1], "transformer_blocks.0.attn")


def test_uneven_heads_plan_at_real_configs():
    """Sana (70 heads), SD3.5 Large (38), Ideogram 4 (18) and Z-Image (30) were refused at tp 4: now every rank
    holds whole heads, one more on some, and about a quarter of the weights."""
    from diffpar.testing.coverage import class_available

    for module, label, cls in [("sana", "Sana-1600M-1024px", "SanaTransformer2DModel"),
                               ("first_families_tp", "SD3.5 Large", "SD3Transformer2DModel"),
                               ("ideogram4", "Ideogram 4", "Ideogram4Transformer2DModel")]:
        if class_available(cls):
            # Ideogram 4: 5 of 18 heads on the largest rank (0.263 of the weights).
            assert _real_config_ratio(module, label, 4) <= 0.265, label


def test_fewer_heads_than_ranks_is_refused():
    from diffpar.testing import tiny_transformers

    model, _ = tiny_transformers.build("wan", heads=3)
    with pytest.raises(diffpar.UnsupportedError) as err:
        diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(tp_size=4), world_size=4)
    assert "tp_size=4 is more than the 3 attention heads" in str(err.value)
    assert "largest tp_size that works for this model is 2" in str(err.value)


def test_ulysses_over_uneven_local_heads_is_refused_naming_them():
    """U x TP: Ulysses spreads each tensor-parallel rank's local heads; 8 heads on tp 3 are 3, 3 and 2."""
    from diffpar.engines.tensor_parallel import check_hybrid
    from diffpar.families.transformers import tp_plans
    from diffpar.testing import tiny_transformers

    model, _ = tiny_transformers.build("wan", heads=8)
    plan = tp_plans.shard_plan_for(model, 3)
    assert sorted({q for q, _ in plan.heads["blocks.0.attn1"]}) == [2, 3]
    with pytest.raises(diffpar.UnsupportedError) as err:
        check_hybrid(model, plan, diffpar.ParallelismConfig(ulysses_size=2, tp_size=3))
    message = str(err.value)
    assert "2 or 3 of the 8 heads" in message and "ulysses_anything=True" in message, message
    check_hybrid(model, plan, diffpar.ParallelismConfig(ulysses_size=2, tp_size=3, ulysses_anything=True))


def test_packed_experts_are_split_along_their_hidden_width(ranks):
    """Nucleus-MoE's routed experts are one 3-D parameter for all experts (before: 0.967 of the real model's
    weights per rank at tp 2): each rank keeps the gate/up columns and down rows of its part of the hidden width,
    and the experts' output is all-reduced. 3 ranks over a hidden width of 32: 11, 11 and 10."""
    from tolerances import BITWISE, TRANSFORMER_TP_FP32

    from diffpar.testing.coverage import class_available

    if not class_available("NucleusMoEImageTransformer2DModel"):
        pytest.skip("this diffusers release has no NucleusMoEImageTransformer2DModel")
    assert _real_config_ratio("nucleusmoe", "Nucleus-MoE Image", 2) <= 0.51
    assert _real_config_ratio("nucleusmoe", "Nucleus-MoE Image", 4) <= 0.26
    results = ranks(3, "workers.transformer_tp:tp_equivalence", model_name="nucleusmoe", config={"tp_size": 3},
                    model_kwargs={"heads": 3})
    for r in results:
        assert r["diff"] <= TRANSFORMER_TP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == BITWISE and r["detach_weights_equal"], r["rank"]
        hidden = [11, 11, 10][r["rank"]]
        shapes = r["local_parameter_shapes"]
        assert shapes["transformer_blocks.1.img_mlp.experts.gate_up_proj"][2] == 2 * hidden, shapes
        assert shapes["transformer_blocks.1.img_mlp.experts.down_proj"][1] == hidden, shapes
    assert {r["plan_bytes"] for r in results} == {max(r["sharded_bytes"] for r in results)}


def test_ulysses_anything_over_too_few_local_heads_is_refused():
    """ulysses_anything pads each tensor-parallel rank's local heads: 5 heads on tp 4 leave a rank 1 head, too few
    to pad over 2 Ulysses ranks; 8 heads on tp 3 (3, 3, 2) pad."""
    from diffpar.engines.tensor_parallel import check_hybrid
    from diffpar.families.transformers import tp_plans
    from diffpar.testing import tiny_transformers

    model, _ = tiny_transformers.build("wan", heads=5)
    config = diffpar.ParallelismConfig(ulysses_size=2, tp_size=4, ulysses_anything=True)
    with pytest.raises(diffpar.UnsupportedError, match="holds 1 of the 5 heads"):
        check_hybrid(model, tp_plans.shard_plan_for(model, 4), config)
    model, _ = tiny_transformers.build("wan", heads=8)
    check_hybrid(model, tp_plans.shard_plan_for(model, 3),
                 diffpar.ParallelismConfig(ulysses_size=2, tp_size=3, ulysses_anything=True))
