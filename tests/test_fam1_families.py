"""The fam1 families (Chroma, Qwen-Image 2.1, ...) beyond the harness's unpadded inputs: a padded prompt under
Ulysses matches one process with the split proven, and the modes a family cannot run refuse clearly."""
import pytest
from tolerances import CP_FP32

from diffpar.testing import RankFailure
from diffpar.testing.probes import assert_split

ULYSSES = [(2, {"ulysses_size": 2}, 16, 8), (4, {"ulysses_size": 4}, 16, 8),
           (2, {"ulysses_size": 2, "ulysses_anything": True}, 15, 7)]


PADDED_ULYSSES = [pytest.param(builder, 3, *layout, id=f"{builder}-{name}") for builder in ("chroma", "bria_fibo")
                  for layout, name in zip(ULYSSES, ["w2-ulysses", "w4-ulysses", "w2-ulysses-anything"])]
PADDED_ULYSSES += [pytest.param("qwenimage21", 3, *ULYSSES[i], id=f"qwenimage21-{name}")
                   for i, name in ((0, "w2-ulysses"), (1, "w4-ulysses"))]


@pytest.mark.parametrize("builder,padding,world,config,seq,text", PADDED_ULYSSES)
def test_padded_prompt_under_ulysses(ranks, builder, padding, world, config, seq, text):
    results = ranks(world, "workers.cp_transformers:cp_equivalence", model_name=builder, config=config, seq=seq,
                    text=text, model_kwargs={"heads": 4}, input_kwargs={"text_padding": padding})
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)


REFUSED = [
    pytest.param("chroma", 3, {"ring_size": 2}, 16, 8, "ring attention with a padding attention mask", id="chroma-ring"),
    pytest.param("bria_fibo", 3, {"ring_size": 2}, 16, 8, "ring attention with a padding attention mask",
                 id="bria_fibo-ring"),
    pytest.param("qwenimage21", 0, {"ring_size": 2}, 16, 8, "block-causal", id="qwenimage21-ring"),
    pytest.param("qwenimage21", 0, {"ulysses_size": 2, "ulysses_anything": True}, 15, 7, "block-causal",
                 id="qwenimage21-ulysses-anything"),
]


@pytest.mark.parametrize("builder,padding,config,seq,text,reason", REFUSED)
def test_unsupported_mode_is_refused(ranks, builder, padding, config, seq, text, reason):
    with pytest.raises(RankFailure) as err:
        ranks(2, "workers.cp_transformers:cp_equivalence", model_name=builder, config=config, seq=seq,
              text=text, model_kwargs={"heads": 4}, input_kwargs={"text_padding": padding})
    assert "2 rank(s) failed" in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("world,config,seq,text", ULYSSES, ids=["w2-ulysses", "w4-ulysses", "w2-ulysses-anything"])
def test_bria_fibo2_gist_padding_under_ulysses(ranks, world, config, seq, text):
    # Two prompts of 16 and 4 real tokens: 8 and 4 gist tokens, so the main layers get a gist padding mask.
    results = ranks(world, "workers.cp_transformers:cp_equivalence", model_name="bria_fibo2", config=config,
                    seq=seq, text=16, batch=2, model_kwargs={"heads": 4}, input_kwargs={"text_padding": 12})
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)


def test_bria_fibo2_gist_padding_under_ring_is_refused(ranks):
    with pytest.raises(RankFailure) as err:
        ranks(2, "workers.cp_transformers:cp_equivalence", model_name="bria_fibo2", config={"ring_size": 2},
              seq=16, text=16, batch=2, model_kwargs={"heads": 4}, input_kwargs={"text_padding": 12})
    assert "2 rank(s) failed" in str(err.value) and "ring attention with a padding attention mask" in str(err.value)
