"""torchao weight-only int8 (runs on CPU) under diffpar (issue 14).

Context parallelism splits the sequence and leaves every weight as it is, so a quantized model runs unchanged:
compared with the same quantized model in one process (CP_FP32). Tensor parallelism refuses quantized layers by
name, before anything changes: slicing an Int8Tensor's data and per-row scales would be exact for column-parallel
layers, but a row-parallel layer quantized after sharding gets other scales than the whole row (not the same
model), so diffpar does not do either (docs/gpu.md). Needs torchao (skipped without it).
"""
import pytest
from tolerances import CP_FP32

from diffpar.testing.probes import assert_split

pytest.importorskip("torchao", reason="torchao weight-only int8 is the quantization under test")


@pytest.mark.parametrize("config", [{"ulysses_size": 2}, {"ring_size": 2}], ids=["ulysses", "ring"])
def test_int8_weights_under_context_parallelism(ranks, config):
    results = ranks(2, "workers.quantized:quantized_cp_equivalence", model_name="flux", config=config)
    for r in results:
        assert r["diff"] <= CP_FP32, r
        assert "Int8Tensor" in r["weight_types"], r["weight_types"]  # the model really is quantized
    assert_split(results, config)


def test_int8_weights_refused_by_tensor_parallelism(ranks):
    for message in ranks(2, "workers.quantized:quantized_tp_error", model_name="flux", config={"tp_size": 2}):
        assert message is not None and "UnsupportedError" in message, message
        assert "transformer_blocks.0.attn.to_q" in message and "quantized" in message, message
