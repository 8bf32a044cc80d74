"""torchao weight-only int8 (runs on CPU) under diffpar (issue 14).

Context parallelism splits the sequence and leaves every weight as it is, so a quantized model runs unchanged.
Tensor parallelism cuts each int8 weight as it is (rows with their per-row scales for a column-parallel layer,
columns with the whole scales for a row-parallel one; compat/quantized_tensors.py), never re-quantizing, so the
sharded model is the same quantized model: compared with it in one process. Layouts diffpar has no rule for are
refused by name before any change. Needs torchao (skipped without it).
"""
import pytest
import torch
from tolerances import BITWISE, CP_FP32, TRANSFORMER_TP_FP32, TP_FP32

from diffpar.testing.probes import assert_split

pytest.importorskip("torchao", reason="torchao weight-only int8 is the quantization under test")


@pytest.mark.parametrize("config", [{"ulysses_size": 2}, {"ring_size": 2}], ids=["ulysses", "ring"])
def test_int8_weights_under_context_parallelism(ranks, config):
    results = ranks(2, "workers.quantized:quantized_cp_equivalence", model_name="flux", config=config)
    for r in results:
        assert r["diff"] <= CP_FP32, r
        assert "Int8Tensor" in r["weight_types"], r["weight_types"]  # the model really is quantized
    assert_split(results, config)


TP_CONFIGS = [
    pytest.param(2, {"tp_size": 2}, id="tp2"),
    pytest.param(4, {"tp_size": 4}, id="tp4"),
    pytest.param(4, {"ulysses_size": 2, "tp_size": 2}, id="ulysses2xtp2"),
]


@pytest.mark.parametrize("world,config,loaded,model_name,quant", [
    *[pytest.param(*p.values, False, "flux", "int8", id=p.id) for p in TP_CONFIGS],
    # loaded by diffusers with TorchAoConfig (is_quantized): the same int8 tensors, split the same way. Wan: a
    # diffpar plan; Flux, Flux2, QwenImage: diffusers' _tp_plan, whose own pre-check (0.41+) refuses any quantized
    # model: diffpar skips that one refusal for torchao weights it cuts as they are (its other checks still run)
    pytest.param(2, {"tp_size": 2}, True, "wan", "int8", id="wan-tp2-from_pretrained"),
    *[pytest.param(2, {"tp_size": 2}, True, name, "int8", id=f"{name}-tp2-from_pretrained")
      for name in ("flux", "flux2", "qwenimage")],
    # float8 weight-only (Float8Tensor, per-row scales) has a CPU path too: the same rule, another table entry
    pytest.param(2, {"tp_size": 2}, False, "flux", "float8", id="float8-tp2"),
])
def test_int8_weights_under_tensor_parallelism(ranks, world, config, loaded, model_name, quant):
    tp = config["tp_size"]
    results = ranks(world, "workers.quantized:quantized_tp_equivalence", model_name=model_name, config=config,
                    loaded=loaded, quant=quant)
    layout = {"int8": "Int8Tensor", "float8": "Float8Tensor"}[quant]
    for r in results:
        # the same quantized model: row-parallel partial sums add in another order, as for plain fp32 weights
        assert r["diff"] <= TRANSFORMER_TP_FP32, (r["rank"], r["diff"])
        assert layout in r["weight_types"], r["weight_types"]  # shards stay quantized, not dequantized
        # each rank holds about 1/tp of the int8 data (embedders and norms outside blocks stay whole)
        assert r["bytes_ratio"] < 1 / tp + 0.25, (r["rank"], r["bytes_ratio"])
        # to_q (column-parallel, 4 heads) keeps its rows and one scale per row; its block stays one row
        rows, columns = r["q_shard"]["full_shape"]
        assert r["q_shard"]["shape"] == [rows // tp, columns] and r["q_shard"]["scale"] == [rows // tp, 1], r
        assert r["q_shard"]["block_size"] == [1, columns], r["q_shard"]
        assert r["detach_diff"] == BITWISE and r["detach_weights_equal"], r
        # the plan counts what the weights store (int8 / float8 data and scales), not their float dtype: the whole
        # model, and each rank's shards (tp splits evenly here), to a few bytes
        assert r["planned_bytes"] == r["held_bytes"], r
        assert abs(r["planned_bytes_per_rank"] - r["held_bytes_sharded"]) <= 16, r
    assert_split(results, config)  # tp alone: all-reduces in every forward; with Ulysses: the sequence split too


@pytest.mark.parametrize("name", ["t5", "qwen3"])
def test_int8_text_encoder_under_tensor_parallelism(ranks, name):
    results = ranks(2, "workers.quantized:quantized_text_encoder", name=name)
    for r in results:
        assert r["quantized_before"]
        assert max(r["diffs"].values()) <= TP_FP32, (r["rank"], r["diffs"])
        assert r["bytes_ratio"] < 0.75, (r["rank"], r["bytes_ratio"])  # each rank holds about half the int8 data
        assert max(r["detach_diffs"].values()) == BITWISE and r["detach_weights_equal"], r
    assert results[0]["heads_per_rank"] == results[1]["heads_per_rank"]
    if name == "t5":  # its tiny feed-forward width is odd: the int8 rows and scales split unevenly
        assert results[0]["shard_shapes"] != results[1]["shard_shapes"]


@pytest.mark.parametrize("layout,expected", [
    ("intx", "IntxUnpackedToInt8Tensor"),  # another torchao layout: no slicing rule
    ("int8-groups", "quantized in groups along dimension 1"),  # int8 scales per group, cut across by a row layer
])
def test_unknown_layouts_refused_by_tensor_parallelism(ranks, layout, expected):
    for r in ranks(2, "workers.quantized:quantized_tp_error", model_name="flux", config={"tp_size": 2},
                   layout=layout):
        message = r["message"]
        assert message is not None and "UnsupportedError" in message, message
        assert expected in message and "transformer_blocks.0" in message, message
        assert r["unchanged"], "refused before any change"


def test_sharded_loading_refuses_quantized_weights(tmp_path):
    """weights_from reads plain weights into plain shards: a model quantized on the meta device would silently
    come back unquantized, so planning refuses it by name (no collective: one process, world_size given)."""
    import diffpar
    from diffpar.testing import tiny_pipelines
    from workers.quantized import _quantize
    from workers.sharded_loading import _meta_pipeline

    reference = tiny_pipelines.build_tiny_flux_pipeline()
    reference.transformer.save_pretrained(tmp_path / "transformer")
    pipe = _meta_pipeline(reference, names=("transformer",))
    _quantize(pipe.transformer)
    config = diffpar.ParallelismConfig(tp_size=2, weights_from={"transformer": str(tmp_path / "transformer")})
    with pytest.raises(diffpar.UnsupportedError, match=r"quantized weight \(Int8Tensor \(torchao\)\)"):
        diffpar.plan(pipe, parallelism_config=config, world_size=2)


@pytest.mark.parametrize("fail_ranks", [[1], [0, 1]], ids=["one", "all"])
def test_int8_tensor_parallel_rollback_is_exact(ranks, fail_ranks):
    for r in ranks(2, "workers.quantized:quantized_tp_rollback", model_name="flux", config={"tp_size": 2},
                   fail_ranks=fail_ranks):
        assert r["sharded"], "the failure must come after the int8 shards were in place"
        assert r["error"] is not None, r
        assert r["weights_equal"] and r["output_diff"] == BITWISE, r


def _loaded_with(model, method: str):
    """`model` marked as diffusers marks one it loaded with a `quantization_config` of this method."""
    from types import SimpleNamespace

    model.is_quantized = True
    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(quant_method=method))
    return model


def _needs_native_tp_prechecks():
    from diffpar.compat import diffusers_tp

    if not diffusers_tp.has_native_tp():
        pytest.skip("the installed diffusers has no _tp_plan (0.40+)")
    import diffusers.hooks.tensor_parallel as htp

    if not hasattr(htp, "_check_tp_supported"):
        pytest.skip("the installed diffusers has no tensor-parallel pre-check (0.41+)")


@pytest.mark.parametrize("model_name", ["wan", "flux"])
def test_models_loaded_with_another_quantizer_stay_refused(model_name):
    """A model diffusers loaded with a non-torchao quantization_config (bitsandbytes, GGUF, quanto) is refused
    by name at planning; a torchao one goes on to the layer-by-layer layout check (tested above). Wan: a diffpar
    plan (diffpar's own refusal); Flux: diffusers' _tp_plan (diffusers' pre-check refuses it, named by diffpar)."""
    import diffpar
    from diffpar.testing import tiny_transformers

    if model_name == "flux":
        _needs_native_tp_prechecks()
    model, _ = tiny_transformers.build(model_name, heads=4)
    _loaded_with(model, "bitsandbytes")
    with pytest.raises(diffpar.UnsupportedError, match="loaded quantized with 'bitsandbytes'"):
        diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(tp_size=2), world_size=2)


def test_torchao_model_of_an_uncut_layout_stays_refused_by_diffusers_check():
    """Flux loaded with torchao in a layout diffpar has no slicing rule for (int4 values in groups): diffusers'
    refusal of quantized models stands, naming torchao and the weight diffpar cannot cut."""
    import diffpar
    from diffpar.testing import tiny_transformers
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    _needs_native_tp_prechecks()
    model, _ = tiny_transformers.build("flux", heads=4)
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(4)))
    _loaded_with(model, "torchao")
    with pytest.raises(diffpar.UnsupportedError, match=r"loaded quantized with 'torchao'.*IntxUnpackedToInt8Tensor"):
        diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(tp_size=2), world_size=2)


def test_torchao_model_still_meets_diffusers_other_checks():
    """Only diffusers' "quantized" refusal is skipped for a torchao int8 model: its other checks still run (here:
    a model placed by accelerate's device_map, which diffpar's own checks do not look at), and the same model
    without it plans (the int8 weights counted as they are stored)."""
    import diffpar
    from diffpar.compat.quantized_tensors import storage_bytes
    from diffpar.testing import tiny_transformers
    from workers.quantized import _quantize

    _needs_native_tp_prechecks()
    model, _ = tiny_transformers.build("flux", heads=4)
    _loaded_with(_quantize(model), "torchao")
    config = diffpar.ParallelismConfig(tp_size=2)
    plan = diffpar.plan(model, parallelism_config=config, world_size=2).components[0]
    assert plan.engine == "tensor parallel" and "diffusers" in plan.source, plan
    assert plan.weight_bytes == sum(storage_bytes(p) for p in model.parameters())
    assert plan.weight_bytes < sum(p.numel() for p in model.parameters()) * 4 * 0.5  # int8, not fp32
    model.hf_device_map = {"": "cpu"}
    with pytest.raises(diffpar.UnsupportedError, match="accelerate"):
        diffpar.plan(model, parallelism_config=config, world_size=2)
