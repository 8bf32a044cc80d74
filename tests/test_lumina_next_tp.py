"""Tensor parallelism of Lumina-Next's pieces diffpar adds for it: a LayerNorm over all heads sharded over the
ranks (one all-reduce of [sum, sum of squares] per token), its statistics counting features that several ranks
hold (a shared key/value head) once, and the plan (norm kinds, the per-head gate following attn2's heads).
The whole model against one process, per layout, is in tests/test_families.py (case "lumina_next")."""
import pytest
import torch

from diffpar.engines.tp_shard import LAYER_NORM, RMS_NORM, NormShard, scale_ranges, split_heads


def _layouts():
    # (world, per-rank feature ranges of a 4-head x 4-feature width): even, uneven, and a key/value width of
    # 2 heads on 3 ranks (ranks 0 and 1 share head 0).
    even = [((0, 8),), ((8, 16),)]
    uneven = [((a, b),) for a, b in scale_ranges([s.q for s in split_heads(4, 4, 3)], 4)]
    shared = [((a, b),) for a, b in scale_ranges([s.kv for s in split_heads(4, 2, 3)], 4)]
    return [pytest.param(2, 16, even, id="w2"), pytest.param(3, 16, uneven, id="w3-uneven"),
            pytest.param(3, 8, shared, id="w3-shared-kv-head")]


@pytest.mark.parametrize("world,width,ranges", _layouts())
def test_layer_norm_shards_put_together_are_the_whole_layer_norm(ranks, world, width, ranges):
    results = ranks(world, "workers.lumina_next_tp:layer_norm_pieces", width=width, ranges=ranges)
    full = results[0]["full"]
    for rank, r in enumerate(results):
        held = sum(b - a for a, b in ranges[rank])
        # Split: each rank saw only its features and holds only their weight and bias.
        assert r["input_width"] == held < width
        assert r["weight"] == r["bias"] == (held,)
        assert r["all_reduces"] == [(2, 2, 5)], "one all-reduce of [sum, sum of squares] per token"
        expected = torch.cat([full[..., a:b] for a, b in ranges[rank]], dim=-1)
        torch.testing.assert_close(r["piece"], expected, rtol=1e-5, atol=1e-5)
    covered = sorted({f for rs in ranges for a, b in rs for f in range(a, b)})
    assert covered == list(range(width)), "the pieces cover the whole width"


def test_counted_features_skip_those_a_lower_rank_holds():
    shared = NormShard("n", 8, (((0, 4),), ((0, 4),), ((4, 8),)), LAYER_NORM)
    assert [shared.counted(r) for r in range(3)] == [((0, 4),), (), ((0, 4),)]
    packed = NormShard("n", 12, (((0, 2), (6, 8)), ((2, 6), (8, 12))))
    assert packed.kind == RMS_NORM  # the default: RMSNorm shards as before
    assert [packed.counted(r) for r in range(2)] == [((0, 4),), ((0, 8),)]
    partly = NormShard("n", 8, (((0, 4),), ((2, 6),)), LAYER_NORM)
    assert partly.counted(1) == ((2, 4),)


def test_plan_shards_the_norms_and_the_gate_by_heads():
    from diffpar.families.transformers import tp_plans
    from diffpar.testing.tiny_transformers import build

    model, _ = build("lumina_next", heads=4, kv_heads=2)
    plan = tp_plans.shard_plan_for(model, 3)
    assert {n.kind for n in plan.norms} == {LAYER_NORM}
    assert {n.path.rsplit(".", 1)[1] for n in plan.norms} == {"norm_q", "norm_k"}
    q_heads = [(s.num_q) for s in split_heads(4, 2, 3)]
    assert len(plan.head_parameters) == len(model.layers)
    for spec in plan.head_parameters:
        assert spec.name == "gate" and [b - a for (a, b), in spec.ranges] == q_heads
        assert [q for q, _ in plan.heads[f"{spec.path}.attn2"]] == q_heads
    by_path = {s.path: s for s in plan.layers}
    assert by_path["layers.0.attn2.to_out.0"].kind == "row"
    assert by_path["layers.0.feed_forward.linear_2"].kind == "row"
    assert by_path["layers.0.feed_forward.linear_1"].kind == "column"


def test_rollback_before_commit_restores_norms_and_gate_locally(ranks):
    """A later step failing undoes the tensor-parallel step before commit: no collective, every weight (the
    LayerNorm shards' weight and bias, the sliced gates) back bit for bit."""
    for r in ranks(2, "workers.transformer_tp:rollback_before_commit", model_name="lumina_next",
                   model_kwargs={"heads": 4, "kv_heads": 2}):
        assert r["collectives"] == [] and r["same_layers"] and r["restored"], r
        assert r["plain_tensors"] and r["weight_shape"][0] == r["expected_rows"] < r["full_shape"][0], r
