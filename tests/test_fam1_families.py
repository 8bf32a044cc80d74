"""The fam1 families (Chroma, Qwen-Image 2.1, ...) beyond the harness's unpadded inputs: a padded prompt under
Ulysses matches one process with the split proven, and the modes a family cannot run refuse clearly."""
import pytest
from tolerances import CP_FP32

from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks
from diffpar.testing import RankFailure
from diffpar.testing.coverage import class_available
from diffpar.testing.probes import assert_split

CLASSES = {"chroma": "ChromaTransformer2DModel", "bria_fibo": "BriaFiboTransformer2DModel",
           "bria_fibo2": "BriaFibo2Transformer2DModel", "qwenimage21": "QwenImage21Transformer2DModel"}


def _require(builder):
    if not class_available(CLASSES[builder]):
        pytest.skip(f"this diffusers release has no {CLASSES[builder]}")


def cp_config_fields_have(name: str) -> bool:
    from diffpar.compat.diffusers_cp import cp_config_fields

    return name in cp_config_fields()


def _run_padded(ranks, expect_cp, world, config, **kwargs):
    """A padded prompt under Ulysses: where this release's context-parallel attention takes no mask (0.36), every
    rank refuses it clearly; otherwise the per-rank results (None where the release cannot run the layout)."""
    if not context_parallel_attention_takes_masks():
        with pytest.raises(RankFailure) as err:
            ranks(world, "workers.cp_transformers:cp_equivalence", config=config, **kwargs)
        assert "cannot apply attention masks in context-parallel attention" in str(err.value) or \
            "ulysses_anything" in str(err.value)
        return None
    return expect_cp(ranks, world, config, "workers.cp_transformers:cp_equivalence", **kwargs)


ULYSSES = [(2, {"ulysses_size": 2}, 16, 8), (4, {"ulysses_size": 4}, 16, 8),
           (2, {"ulysses_size": 2, "ulysses_anything": True}, 15, 7)]


PADDED_ULYSSES = [pytest.param(builder, 3, *layout, id=f"{builder}-{name}") for builder in ("chroma", "bria_fibo")
                  for layout, name in zip(ULYSSES, ["w2-ulysses", "w4-ulysses", "w2-ulysses-anything"])]
PADDED_ULYSSES += [pytest.param("qwenimage21", 3, *ULYSSES[i], id=f"qwenimage21-{name}")
                   for i, name in ((0, "w2-ulysses"), (1, "w4-ulysses"), (2, "w2-ulysses-anything"))]
# Qwen-Image 2.1's own all-to-alls with four unequal parts (7 text + 16 image tokens: 6, 6, 6, 5).
PADDED_ULYSSES += [pytest.param("qwenimage21", 3, 4, {"ulysses_size": 4, "ulysses_anything": True}, 15, 7,
                                id="qwenimage21-w4-ulysses-anything")]


@pytest.mark.parametrize("builder,padding,world,config,seq,text", PADDED_ULYSSES)
def test_padded_prompt_under_ulysses(ranks, expect_cp, builder, padding, world, config, seq, text):
    _require(builder)
    results = _run_padded(ranks, expect_cp, world, config, model_name=builder, seq=seq, text=text,
                          model_kwargs={"heads": 4}, input_kwargs={"text_padding": padding})
    if results is None:
        return
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)


REFUSED = [
    pytest.param("chroma", 3, {"ring_size": 2}, 16, 8, "ring attention with a padding attention mask", id="chroma-ring"),
    pytest.param("bria_fibo", 3, {"ring_size": 2}, 16, 8, "ring attention with a padding attention mask",
                 id="bria_fibo-ring"),
    pytest.param("qwenimage21", 0, {"ring_size": 2}, 16, 8, "block-causal", id="qwenimage21-ring"),
]


@pytest.mark.parametrize("builder,padding,config,seq,text,reason", REFUSED)
def test_unsupported_mode_is_refused(ranks, builder, padding, config, seq, text, reason):
    _require(builder)
    if "ulysses_anything" in config and not cp_config_fields_have("ulysses_anything"):
        pytest.skip("this diffusers release has no ulysses_anything")
    if builder != "qwenimage21" and not context_parallel_attention_takes_masks():
        reason = "cannot apply attention masks in context-parallel attention"
    with pytest.raises(RankFailure) as err:
        ranks(2, "workers.cp_transformers:cp_equivalence", model_name=builder, config=config, seq=seq,
              text=text, model_kwargs={"heads": 4}, input_kwargs={"text_padding": padding})
    assert "2 rank(s) failed" in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("world,config,seq,text", ULYSSES, ids=["w2-ulysses", "w4-ulysses", "w2-ulysses-anything"])
def test_bria_fibo2_gist_padding_under_ulysses(ranks, expect_cp, world, config, seq, text):
    # Two prompts of 16 and 4 real tokens: 8 and 4 gist tokens, so the main layers get a gist padding mask.
    _require("bria_fibo2")
    results = _run_padded(ranks, expect_cp, world, config, model_name="bria_fibo2", seq=seq, text=16, batch=2,
                          model_kwargs={"heads": 4}, input_kwargs={"text_padding": 12})
    if results is None:
        return
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)


def test_bria_fibo2_gist_padding_under_ring_is_refused(ranks):
    _require("bria_fibo2")
    with pytest.raises(RankFailure) as err:
        ranks(2, "workers.cp_transformers:cp_equivalence", model_name="bria_fibo2", config={"ring_size": 2},
              seq=16, text=16, batch=2, model_kwargs={"heads": 4}, input_kwargs={"text_padding": 12})
    assert "2 rank(s) failed" in str(err.value) and "ring attention with a padding attention mask" in str(err.value)


@pytest.mark.parametrize("world,config,seq,text", [ULYSSES[0], ULYSSES[2]], ids=["w2-ulysses", "w2-ulysses-anything"])
def test_qwenimage21_prefix_kv_cache(ranks, expect_cp, world, config, seq, text):
    # The pipeline's default: step one fills each layer's cache with the prefix keys and values (each rank its own
    # heads), later steps run only the target image's tokens against them.
    _require("qwenimage21")
    results = expect_cp(ranks, world, config, "workers.fam1_kv:kv_cache_equivalence", seq=seq, text=text,
                        text_padding=2)
    if results is None:
        return
    for r in results:
        assert max(r["diffs"]) <= CP_FP32, (r["rank"], r["diffs"])
    assert_split(results, config)


@pytest.mark.parametrize("world,config,seq,text", [(2, {"ulysses_size": 2}, 16, 8),
                                                   (4, {"ring_size": 4, "ring_anything": True}, 17, 7)],
                         ids=["w2-ulysses", "w4-ring-anything-odd"])
def test_flux3_text_to_image(ranks, expect_cp, world, config, seq, text):
    # The harness runs FLUX.3 with reference-image tokens; text-to-image has only the image and text streams.
    if not class_available("Flux3Transformer2DModel"):
        pytest.skip("this diffusers release has no Flux3Transformer2DModel")
    results = expect_cp(ranks, world, config, "workers.cp_transformers:cp_equivalence", model_name="flux3", seq=seq,
                        text=text, model_kwargs={"heads": 4}, input_kwargs={"reference": False})
    if results is None:
        return
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)
