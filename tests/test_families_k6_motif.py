"""Kandinsky 6 and Motif-Video: what the family harness cannot express (refusals at the call, TP refusals)."""
from __future__ import annotations

import pytest

from diffpar.testing.coverage import class_available

needs_motif = pytest.mark.skipif(not class_available("MotifVideoTransformer3DModel"),
                                 reason="this diffusers release has no MotifVideoTransformer3DModel")


@needs_motif
@pytest.mark.parametrize("config,expected", [
    pytest.param({"ring_size": 2}, ["ring attention cannot apply a key mask", "use ulysses_size"], id="ring"),
    pytest.param({"ulysses_size": 2, "ulysses_anything": True}, ["ulysses_anything cannot apply a key mask"],
                 id="ulysses-anything"),
])
def test_motif_video_padded_prompt_is_refused_where_the_mask_cannot_be_applied(ranks, config, expected):
    results = ranks(2, "workers.cp_plans_ours:cp_forward_error", model_name="motif_video_padded", config=config,
                    model_kwargs={"heads": 4, "padded": True})
    for r in results:
        assert r["type"] == "UnsupportedError", r
        for part in expected + ["encoder_attention_mask masks padded prompt tokens"]:
            assert part in r["message"], (part, r["message"])


@needs_motif
def test_motif_video_single_block_cross_attention_refuses_tensor_parallelism():
    import diffpar
    from diffpar.testing import tiny_transformers

    model, _ = tiny_transformers.build("motif_video", heads=4, cross_single=True)
    with pytest.raises(diffpar.UnsupportedError) as err:
        diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(tp_size=2), world_size=2)
    assert "enable_text_cross_attention_single=True" in str(err.value)
    # Context parallelism still plans (the cross-attention gathers the prompt).
    diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=2), world_size=2)
