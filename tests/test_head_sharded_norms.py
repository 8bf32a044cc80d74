"""Norms over all heads under tensor parallelism (`HeadShardedRMSNorm`, `HeadShardedLayerNorm`) where ranks share
features: with grouped-query attention and a tensor-parallel degree above the key/value heads, a key/value head is
replicated on the ranks that share it, and a norm over all key features sees those features on several ranks. The
all-reduced statistics must count each feature once (from the lowest rank holding it, `NormShard.counted`) and
divide by the whole width; counting it on every rank holding it gives a wrong norm (the RMSNorm did, before)."""
import pytest
import torch
from tolerances import TRANSFORMER_TP_FP32

from diffpar.engines.tp_shard import LAYER_NORM, RMS_NORM, scale_ranges, split_heads
from diffpar.testing.probes import assert_split

KINDS = [pytest.param(RMS_NORM, id="rms"), pytest.param(LAYER_NORM, id="layer")]


def _kv_layout(heads: int, kv_heads: int, world: int, head_dim: int = 4) -> list:
    return [((a, b),) for a, b in scale_ranges([s.kv for s in split_heads(heads, kv_heads, world)], head_dim)]


def _layouts():
    # (world, width, per-rank ranges): key features of 2 key/value heads (4 features each) dealt for 4 query heads
    # over more ranks than key/value heads (evenly and unevenly shared), and a partial overlap (rank 1 shares half
    # of rank 0's features). One key/value head on every rank is in the attention test below: there every rank
    # holds the whole key norm, so only the query heads show the split.
    return [pytest.param(4, 8, _kv_layout(4, 2, 4), id="w4-two-kv-heads-each-on-two"),
            pytest.param(3, 8, _kv_layout(4, 2, 3), id="w3-two-kv-heads-first-on-two"),
            pytest.param(3, 8, [((0, 4),), ((2, 6),), ((6, 8),)], id="w3-partial-overlap")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world,width,ranges", _layouts())
def test_shared_features_count_once_in_the_norm_statistics(ranks, kind, world, width, ranges):
    results = ranks(world, "workers.head_sharded_norms:norm_pieces", kind=kind, width=width, ranges=ranges)
    held = [sum(b - a for a, b in rs) for rs in ranges]
    assert sum(held) > width, "the layout shares features between ranks (the case this guards)"
    assert sum(r["counted"] for r in results) == width, "every feature counted once over the ranks"
    full = results[0]["full"]
    stats = 2 if kind == LAYER_NORM else 1
    for rank, r in enumerate(results):
        # Split: each rank saw only its features, holds only their weight, and issued one all-reduce per call.
        assert r["input_width"] == r["weight"][0] == held[rank] < width
        assert r["all_reduces"] == [(stats, 2, 5)], r["all_reduces"]
        expected = torch.cat([full[..., a:b] for a, b in ranges[rank]], dim=-1)
        torch.testing.assert_close(r["piece"], expected, rtol=TRANSFORMER_TP_FP32, atol=TRANSFORMER_TP_FP32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world,kv_heads", [pytest.param(2, 1, id="tp2-kv1"), pytest.param(4, 1, id="tp4-kv1"),
                                            pytest.param(4, 2, id="tp4-kv2"), pytest.param(2, 2, id="tp2-kv2-unshared")])
def test_gqa_attention_with_norms_across_heads_matches_one_process(ranks, kind, world, kv_heads):
    """4 query heads, 1 or 2 key/value heads, a norm over all query features and one over all key features, planned
    by `even_shard_plan` and sharded by the engine: the output is one process's, the key norm's piece is the whole
    key norm's on this rank's features, and detach gives every weight back."""
    results = ranks(world, "workers.head_sharded_norms:gqa_attention", norm=kind, kv_heads=kv_heads)
    assert_split(results, {"tp_size": world})
    shared = world > kv_heads
    width = results[0]["key_width"]
    assert width == 4 * kv_heads
    assert sum(r["key_counted"] for r in results) == width, "every key feature counted once over the ranks"
    assert (sum(r["key_held"] for r in results) > width) == shared
    if shared:  # the ranks sharing a key/value head: the lowest of them counts its features, the others none
        assert sorted(r["key_counted"] for r in results) == sorted([4] * kv_heads + [0] * (world - kv_heads))
    q_heads = [s.num_q for s in split_heads(4, kv_heads, world)]
    for rank, r in enumerate(results):
        assert r["plan_kind"] == kind
        expected_type = "HeadShardedLayerNorm" if kind == LAYER_NORM else "HeadShardedRMSNorm"
        assert r["norm_types"] == (expected_type, expected_type)
        # Split: this rank computes its query heads only, and its key norm holds fewer features than the whole.
        assert r["heads"] == (q_heads[rank], 1 if shared else kv_heads // world)
        assert r["q_held"] == 4 * q_heads[rank] < 16
        assert r["key_held"] == (4 if shared else width // world)
        torch.testing.assert_close(r["keys"], r["whole_keys_mine"], rtol=TRANSFORMER_TP_FP32,
                                   atol=TRANSFORMER_TP_FP32)
        torch.testing.assert_close(r["out"], r["reference"], rtol=TRANSFORMER_TP_FP32, atol=TRANSFORMER_TP_FP32)
        assert r["restored"], "detach gathered the whole weights back"
