"""Text-encoder tensor parallelism: every family vs one process, head splits, errors, detach, memory, pipelines."""
import pytest
from tolerances import PIPELINE_FP32, TP_FP32

from diffpar.families.text_encoders.base import build_plan, transformers_plan
from diffpar.errors import DiffparError, UnsupportedError
from diffpar.engines.tp_shard import HeadCountError, split_heads, split_ranges
from diffpar.testing import tiny_text_encoders

WORKER = "workers.text_encoders"


# -- every family, both attention implementations, 2 and 4 ranks ------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("world", [2, 4])
def test_every_family_matches_one_process(ranks, world, attn):
    """Batch of 2, odd length 11, the second row right-padded (attention mask with padding)."""
    names = [n for n in tiny_text_encoders.FAMILIES if tiny_text_encoders.supports_attention(n, attn)]
    results = ranks(world, f"{WORKER}:family_equivalence", names=names, attn=attn, timeout=240)
    for name in names:
        per_rank = [r["results"][name] for r in results]
        for r, res in enumerate(per_rank):
            for output, diff in res["diffs"].items():
                assert diff <= TP_FP32, (name, attn, world, r, output, diff)
            assert res["bytes_ratio"] < 0.9, (name, res["bytes_ratio"])  # sharded, not replicated
        # Every rank hands the pipeline bit-identical embeddings.
        assert len({res["checksum"] for res in per_rank}) == 1, name
    # Key/value heads replicated when the world exceeds them (Llama: 8 query / 2 KV heads on 4 ranks), and the
    # uneven split of Qwen2.5-VL's 7 query heads over one shared KV head.
    by_name = results[0]["results"]
    if world == 4:
        assert by_name["llama"]["heads_per_rank"] == [((2, 1), (2, 1), (2, 1), (2, 1))]
        assert by_name["qwen2_5_vl"]["heads_per_rank"] == [((2, 1), (2, 1), (2, 1), (1, 1))]
        assert by_name["t5-gated"]["heads_per_rank"] == [((2, 2), (2, 2), (1, 1), (1, 1))]
    else:
        assert by_name["qwen2_5_vl"]["heads_per_rank"] == [((4, 1), (3, 1))]
        assert by_name["clip-projection"]["heads_per_rank"] == [((3, 3), (2, 2))]


def test_unpadded_inputs_take_sdpa_grouped_query_path(ranks):
    """Without a mask transformers' sdpa uses enable_gqa with the local num_key_value_groups."""
    names = ["llama", "gemma", "qwen2_5_vl", "qwen3", "t5", "clip"]
    results = ranks(4, f"{WORKER}:family_equivalence", names=names, attn="sdpa", pad=False, seq=8, batch=1)
    for r in results:
        for name, res in r["results"].items():
            assert max(res["diffs"].values()) <= TP_FP32, (name, res["diffs"])


def test_per_rank_head_attributes(ranks):
    llama = ranks(4, f"{WORKER}:local_heads", name="llama")
    assert [r["num_key_value_groups"] for r in llama] == [2, 2, 2, 2]
    qwen = ranks(4, f"{WORKER}:local_heads", name="qwen2_5_vl")
    assert [(r["num_heads"], r["num_key_value_heads"], r["num_key_value_groups"]) for r in qwen] == [
        (2, 1, 2), (2, 1, 2), (2, 1, 2), (1, 1, 1)]
    t5 = ranks(2, f"{WORKER}:local_heads", name="t5-gated")
    assert [(r["n_heads"], r["inner_dim"]) for r in t5] == [(3, 24), (3, 24)]
    clip = ranks(2, f"{WORKER}:local_heads", name="clip-projection")
    assert [r["num_heads"] for r in clip] == [3, 2]


# -- errors: on every rank, before any collective ---------------------------------------------------------------
def test_too_few_heads_error_names_the_largest_degree(ranks):
    results = ranks(4, f"{WORKER}:check_error", name="clip", overrides={"heads": 2, "hidden": 32})
    for r in results:
        assert r["type"] == "HeadCountError"
        msg = r["message"]
        assert "2 attention heads" in msg and "4 ranks" in msg, msg
        assert "at most 2 ranks" in msg and "extra_parallel_modules" in msg, msg


def test_too_few_heads_through_enable_cache(ranks):
    """The same error from enable_cache on every rank, via the agreement collective; nothing is applied."""
    results = ranks(4, f"{WORKER}:pipeline_error", text_heads=2, ulysses_size=2)
    for r in results:
        assert r["error"] is not None and "at most 2 ranks" in r["error"][1], r
        assert r["untouched"] and not r["handle"]


def test_refusals(ranks):
    results = ranks(2, f"{WORKER}:refusals")
    for r in results:
        assert r["lora"]["type"] == "UnsupportedError"
        assert "not a plain torch.nn.Linear" in r["lora"]["message"]
        assert r["phi3"]["type"] == "UnsupportedError"
        assert "Phi3Model" in r["phi3"]["message"] and "Supported decoder families" in r["phi3"]["message"]
        assert r["clip_vision"][0] == "UnsupportedError"
        assert "CLIPVisionModel" in r["clip_vision"][1]


# -- detach, memory, communication --------------------------------------------------------------------------------
def test_detach_says_reload_or_restores_when_kept(ranks):
    for r in ranks(2, f"{WORKER}:detach_behaviour", name="t5-gated"):
        assert r["detach_error"] is not None
        assert "text_encoder" in r["detach_error"] and "must be reloaded" in r["detach_error"]
        assert "keep_original_text_encoders" in r["detach_error"]
        assert r["after_error"] is not None and "Reload the module" in r["after_error"]
        assert "already a tensor-parallel shard" in r["reenable_error"]
        assert max(r["kept_sharded_diffs"].values()) <= TP_FP32
        assert r["kept_detach_problems"] == []
        assert all(v == 0.0 for v in r["kept_restored_diffs"].values()), "kept original must restore bit for bit"
        assert r["kept_state_equal"]


@pytest.mark.parametrize("world", [2, 4])
def test_full_weights_are_freed(ranks, world):
    for r in ranks(world, f"{WORKER}:memory_freed", name="t5-gated"):
        assert r["alive_full_weights"] == 0, r
        assert r["ratio"] < (0.6 if world == 2 else 0.42), r
        assert r["plan_bytes"] == r["held_bytes"], r


@pytest.mark.parametrize("name", ["t5-gated", "umt5", "clip", "llama", "glm", "qwen2_5_vl"])
def test_two_all_reduces_per_layer(ranks, name):
    for r in ranks(2, f"{WORKER}:count_all_reduces", name=name):
        assert r["all_reduces"] == 2 * r["layers"], r


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_linear_layers(ranks, world):
    for r in ranks(world, f"{WORKER}:parallel_linear_units"):
        assert r["pair"] <= TP_FP32 and r["gather"] <= TP_FP32 and r["split_input"] <= TP_FP32, r


# -- whole pipelines through enable_cache --------------------------------------------------------------------------
@pytest.mark.parametrize("kind,world,ulysses,extra,as_names", [
    pytest.param("flux", 2, 2, ("text_encoder", "text_encoder_2"), False, id="flux-w2-ulysses2"),
    pytest.param("flux", 4, 4, ("text_encoder", "text_encoder_2"), True, id="flux-w4-ulysses4-names"),
    pytest.param("wan", 2, 2, ("text_encoder",), False, id="wan-w2-ulysses2"),
])
def test_pipeline_prompt_embeddings(ranks, kind, world, ulysses, extra, as_names):
    results = ranks(world, f"{WORKER}:pipeline_prompt_embeddings", kind=kind, ulysses_size=ulysses, extra=extra,
                    as_names=as_names, timeout=240)
    for r in results:
        for key, diff in r["embed_diffs"].items():
            assert diff <= TP_FP32, (r["rank"], key, diff)
        assert r["image_diff"] <= PIPELINE_FP32, r["image_diff"]
        assert set(r["text_encoders"]) == set(extra)
        assert all(v["ratio"] < 0.7 for v in r["text_encoders"].values()), r["text_encoders"]
        assert "must be reloaded" in r["detach_error"]
    assert len({r["checksum"] for r in results}) == 1


# -- single-process pieces ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("heads,kv,world", [(8, 8, 2), (8, 2, 4), (28, 4, 8), (7, 1, 4), (12, 3, 2), (20, 20, 8),
                                            (6, 6, 4), (32, 8, 6)])
def test_split_heads_covers_every_query_head_once(heads, kv, world):
    shards = split_heads(heads, kv, world)
    assert len(shards) == world
    group = heads // kv
    covered = []
    for s in shards:
        assert s.num_q >= 1 and s.num_kv >= 1
        assert s.num_q == s.num_kv * s.kv_groups, s  # uniform local groups: repeat_kv stays valid
        q_heads = list(range(*s.q))
        covered += q_heads
        # Each local query head reads the key/value head it reads in the full model.
        for i, h in enumerate(q_heads):
            assert h // group == s.kv[0] + i // s.kv_groups
    assert covered == list(range(heads))


def test_split_heads_errors():
    with pytest.raises(HeadCountError, match="at most 3 ranks"):
        split_heads(3, 3, 4, what="T5EncoderModel")
    with pytest.raises(DiffparError, match="not a multiple"):
        split_heads(6, 4, 2)
    assert split_ranges(7, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]


def test_plan_comes_from_the_transformers_config():
    model, _ = tiny_text_encoders.build("llama")
    assert transformers_plan(model.config) == {k: v for k, v in model.config.base_model_tp_plan.items()}
    plan = build_plan(model, 2)
    kinds = {layer.path.split(".", 2)[2]: layer.kind for layer in plan.layers if layer.path.startswith("layers.0.")}
    assert kinds == {"self_attn.q_proj": "column", "self_attn.k_proj": "column", "self_attn.v_proj": "column",
                     "self_attn.o_proj": "row", "mlp.gate_proj": "column", "mlp.up_proj": "column",
                     "mlp.down_proj": "row"}
    # Vocab embeddings and the LM head stay whole.
    assert not any("embed" in layer.path or "lm_head" in layer.path for layer in plan.layers)


def test_glm_fused_gate_up_is_split_per_chunk():
    model, _ = tiny_text_encoders.build("glm")
    plan = build_plan(model, 2)
    gate_up = next(layer for layer in plan.layers if layer.path == "layers.0.mlp.gate_up_proj")
    inter = model.config.intermediate_size
    assert list(gate_up.ranges[0]) == [(0, inter // 2), (inter, inter + inter // 2)]
    assert not gate_up.gather_output


@pytest.mark.parametrize("name", ["qwen2_5_vl", "mistral3", "gemma3-multimodal", "qwen3_vl", "llava"])
def test_multimodal_wrappers_shard_the_language_model_only(name):
    model, _ = tiny_text_encoders.build(name)
    plan = build_plan(model, 2)
    assert plan.layers and all(layer.path.startswith("model.language_model.") for layer in plan.layers)


def test_qwen3_vl_layers_come_from_our_plan():
    """transformers' Qwen3-VL text plan names only the embeddings; ours shards every attention and MLP layer."""
    model, _ = tiny_text_encoders.build("qwen3_vl")
    plan = build_plan(model, 2)
    paths = {layer.path.rsplit(".", 1)[-1] for layer in plan.layers}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= paths, paths


def test_unknown_transformers_style_is_refused():
    class Config:
        base_model_tp_plan = {"layers.*.mlp.experts": "grouped_gemm"}

    with pytest.raises(UnsupportedError, match="grouped_gemm"):
        transformers_plan(Config())
