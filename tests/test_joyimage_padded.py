"""JoyImage Edit Plus with a padded prompt (issue 12): the model builds its key mask over [image patches, text] from
the whole prompt mask before the split, and diffpar's processor lays it out in Ulysses' key order, so prompts of
different lengths run under Ulysses (fp32 as one process, split proven); Ring refuses them with the reason.

The transformer alone: two samples, one prompt padded, odd lengths at world 2 and 4 (diffusers' uneven Ulysses split,
0.37+). The pipeline: a prompt and a much shorter negative prompt (guidance batches and pads them) on 2 ranks vs one
process."""
import pytest
from tolerances import CP_FP32, PIPELINE_FP32

from availability import diffusers_has
from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks, uneven_split_option
from diffpar.testing import RankFailure
from diffpar.testing.probes import assert_split
from workers.image_pipelines_e import KINDS
import workers.joyimage_padded  # noqa: F401 (registers the padded-prompt pipeline kind in KINDS)

pytestmark = [
    pytest.mark.skipif(not diffusers_has("JoyImageEditPlusPipeline"), reason="this diffusers has no JoyImage Edit Plus"),
    pytest.mark.skipif(not context_parallel_attention_takes_masks(),
                       reason="0.36's context-parallel attention takes no mask (refused clearly: test_compat.py)"),
    pytest.mark.skipif(uneven_split_option(2, 1) is None, reason="odd lengths need diffusers' uneven Ulysses split"),
]

# (world, config, image patches, text tokens): no degree divides the lengths.
ODD_ULYSSES = [
    pytest.param(2, {"ulysses_size": 2}, 15, 7, id="w2-ulysses"),
    pytest.param(4, {"ulysses_size": 4}, 17, 7, id="w4-ulysses"),
    pytest.param(2, {"ulysses_size": 2, "ulysses_anything": True}, 15, 7, id="w2-ulysses-anything"),
]
TEXT_VALID = [7, 3]  # the second sample's prompt: 3 real tokens, 4 padded


@pytest.mark.parametrize("world,config,seq,text", ODD_ULYSSES)
def test_padded_prompt_under_ulysses(ranks, expect_cp, world, config, seq, text):
    results = expect_cp(ranks, world, config, "workers.joyimage_padded:text_padded_cp", seq=seq, text=text, batch=2,
                        model_kwargs={"heads": 4}, input_kwargs={"text_valid": TEXT_VALID})
    if results is None:
        return  # this release cannot run the layout: every rank said so
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0, "detach must restore the model bit for bit"
    assert_split(results, config)


def test_padded_prompt_and_padded_patches_under_ulysses(ranks):
    # Both kinds of padding in one call: 3 padded patches in every sample and the second prompt padded.
    config = {"ulysses_size": 2}
    results = ranks(2, "workers.joyimage_padded:text_padded_cp", config=config, seq=15, text=7, batch=2,
                    model_kwargs={"heads": 4}, input_kwargs={"text_valid": TEXT_VALID, "padded": 3, "reference": 4})
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)


@pytest.mark.parametrize("config", [{"ring_size": 2}, {"ulysses_size": 2, "ring_size": 2}], ids=["w2-ring", "w4-uxr"])
def test_padded_prompt_under_ring_is_refused(ranks, config):
    world = 2 if "ulysses_size" not in config else 4
    with pytest.raises(RankFailure) as err:
        ranks(world, "workers.joyimage_padded:text_padded_cp", config=config, seq=16, text=8, batch=2,
              model_kwargs={"heads": 4}, input_kwargs={"text_valid": [8, 3]})
    assert f"{world} rank(s) failed" in str(err.value)
    assert "ring attention cannot apply" in str(err.value) and "padded prompt" in str(err.value)


def test_pipeline_prompts_of_different_lengths_under_ulysses(ranks):
    config = {"ulysses_size": 2}
    results = ranks(2, "workers.joyimage_padded:padded_pipeline_equivalence", config=config, timeout=300)
    kind = KINDS["joyimage_edit_plus_padded"]
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"], r["scale"])
        assert r["repeat_diff"] == 0.0 and r["ranks_identical"]
        # every transformer call (one process, then parallel) got a prompt mask that masks the negative's padding
        masks = r["masks_seen"]
        assert masks and all(m["masked"] for m in masks), masks
        assert all(m["real_tokens"][0] < m["real_tokens"][1] == m["length"] for m in masks), masks
        assert all(p.startswith("text_encoder") for p in r["detach_problems"]), r["detach_problems"]
        assert set(r["text_encoders"]) == {n for n in kind.parallel if n.startswith("text_encoder")}
        calls = r["vae_calls"]
        assert calls["decode"]["split"] >= 1 and calls["decode"]["whole"] == 0, calls
        assert calls["encode"]["split"] >= 1 and calls["encode"]["whole"] == 0, calls
    assert_split(results, config)
