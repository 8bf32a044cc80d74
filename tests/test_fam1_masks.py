"""Masks of the fam1 families under context parallelism, beyond the harness's unpadded inputs: a padded prompt is
reordered for Ulysses (matches one process, split proven) and refused clearly by ring attention."""
import pytest
from tolerances import CP_FP32

from diffpar.testing import RankFailure
from diffpar.testing.probes import assert_split

ULYSSES = [(2, {"ulysses_size": 2}, 16, 8), (4, {"ulysses_size": 4}, 16, 8),
           (2, {"ulysses_size": 2, "ulysses_anything": True}, 15, 7)]


@pytest.mark.parametrize("builder,padding", [("chroma", 3)])
@pytest.mark.parametrize("world,config,seq,text", ULYSSES, ids=["w2-ulysses", "w4-ulysses", "w2-ulysses-anything"])
def test_padded_prompt_under_ulysses(ranks, builder, padding, world, config, seq, text):
    results = ranks(world, "workers.cp_transformers:cp_equivalence", model_name=builder, config=config, seq=seq,
                    text=text, model_kwargs={"heads": 4}, input_kwargs={"text_padding": padding})
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)


@pytest.mark.parametrize("builder,padding", [("chroma", 3)])
def test_padded_prompt_under_ring_is_refused(ranks, builder, padding):
    with pytest.raises(RankFailure) as err:
        ranks(2, "workers.cp_transformers:cp_equivalence", model_name=builder, config={"ring_size": 2}, seq=16,
              text=8, model_kwargs={"heads": 4}, input_kwargs={"text_padding": padding})
    assert "ring attention with a padding attention mask" in str(err.value)
