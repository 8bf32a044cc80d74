"""BERT / RoBERTa text-encoder tensor parallelism (HunyuanDiT's BertModel): heads and inner features split over sibling modules."""
import pytest
from tolerances import TP_FP32

from diffpar.families.text_encoders.base import build_plan

WORKER = "workers.text_encoder_bert"


CASES = [(world, attn, "bert") for world in (2, 3, 4) for attn in ("sdpa", "eager")] + [
    (world, "sdpa", kind) for world in (2, 4) for kind in ("roberta", "xlm-roberta")]


@pytest.mark.parametrize("world,attn,kind", CASES)
def test_bert_matches_one_process(ranks, world, attn, kind):
    results = ranks(world, f"{WORKER}:equivalence", attn=attn, kind=kind, timeout=240)
    for rank, r in enumerate(results):
        for output, diff in r["diffs"].items():
            assert diff <= TP_FP32, (world, attn, rank, output, diff)
        # The split linears: each rank holds about 1/world of them (5 heads / 75 inner features: uneven, plus the
        # row layers' whole biases), and its whole model bytes are what the plan said.
        assert r["layer_bytes_ratio"] <= 1.0 / world + 0.15, r["layer_bytes_ratio"]
        assert r["layer_bytes_ratio"] >= 1.0 / world - 0.15, r["layer_bytes_ratio"]
        assert r["bytes_ratio"] < 1.0
        assert r["plan_per_rank"] == r["held_bytes"], r
        # One all-reduce after the attention's output projection, one after the MLP's second linear.
        assert r["all_reduces"] == 2 * r["layers"], r
        # Detach with keep_original_text_encoders restores the encoder bit for bit, head counts included.
        assert r["detach_problems"] == []
        assert all(v == 0.0 for v in r["restored_diffs"].values()), r["restored_diffs"]
        assert r["state_equal"]
        assert r["heads_after_detach"] == (5, 40)
    assert len({r["checksum"] for r in results}) == 1  # every rank hands the pipeline the same embeddings
    heads = {2: [3, 2], 3: [2, 2, 1], 4: [2, 1, 1, 1]}[world]
    assert [r["heads"] for r in results] == [(h, 8 * h, 8 * h) for h in heads]
    assert results[0]["heads_per_rank"] == [tuple((h, h) for h in heads)]  # one entry per distinct split


def test_detach_without_kept_weights_says_reload(ranks):
    for r in ranks(2, f"{WORKER}:freed_detach"):
        assert r["detach_error"] is not None and "must be reloaded" in r["detach_error"], r
        assert "keep_original_text_encoders" in r["detach_error"]


def test_plan_groups_sibling_modules():
    """Local plan, no ranks: the attention is split by heads at `attention`, the MLP by features at the layer."""
    from workers.text_encoder_bert import _tiny_bert

    plan = build_plan(_tiny_bert(), 2)
    paths = {layer.path: layer.kind for layer in plan.layers}
    assert paths["encoder.layer.0.attention.self.query"] == "column"
    assert paths["encoder.layer.0.attention.output.dense"] == "row"
    assert paths["encoder.layer.1.intermediate.dense"] == "column"
    assert paths["encoder.layer.1.output.dense"] == "row"
    assert len(paths) == 12
    assert [a.path for a in plan.attributes] == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert plan.attributes[0].values == ({"num_attention_heads": 3, "all_head_size": 24},
                                         {"num_attention_heads": 2, "all_head_size": 16})
