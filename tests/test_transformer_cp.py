"""Transformer context parallelism over diffusers' native plans vs the same model in one process."""
import pytest
from tolerances import CP_FP32

from diffpar.testing.probes import assert_split, split_problems

pytestmark = pytest.mark.compat  # also runs in CI's diffusers 0.36.0 leg

# (world, config, sequence length, model overrides): Ulysses, Ring, both, uneven lengths with *_anything.
LAYOUTS = [
    pytest.param(2, {"ulysses_size": 2}, 16, {}, id="w2-ulysses"),
    pytest.param(2, {"ring_size": 2}, 16, {}, id="w2-ring"),
    pytest.param(4, {"ulysses_size": 4}, 16, {"heads": 4}, id="w4-ulysses"),
    pytest.param(4, {"ulysses_size": 2, "ring_size": 2}, 16, {}, id="w4-ulysses2xring2"),
    pytest.param(4, {"ring_size": 4}, 16, {}, id="w4-ring"),
    pytest.param(2, {"ulysses_size": 2, "ulysses_anything": True}, 15, {}, id="w2-ulysses-anything-odd"),
    pytest.param(4, {"ulysses_size": 4, "ulysses_anything": True}, 13, {"heads": 7}, id="w4-ulysses-anything-odd-heads"),
    pytest.param(4, {"ring_size": 4, "ring_anything": True}, 17, {}, id="w4-ring-anything-odd"),
]

MODELS = ["flux", "flux2", "qwenimage", "wan"]


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("world,config,seq,model_kwargs", LAYOUTS)
def test_cp_matches_one_process(ranks, expect_cp, model_name, world, config, seq, model_kwargs):
    text = 7 if seq % 2 else 8
    results = expect_cp(ranks, world, config, "workers.cp_transformers:cp_equivalence", model_name=model_name,
                        seq=seq, text=text, model_kwargs=model_kwargs)
    if results is None:
        return  # the installed diffusers cannot run this layout; every rank said so clearly
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0, "detach must restore the model bit for bit"
    assert len({r["shape"] for r in results}) == 1
    assert_split(results, config)


def test_split_check_fails_without_parallelism(ranks):
    """The split check bites: the same run with enable_cache skipped matches one process exactly and fails it."""
    config = {"ulysses_size": 2}
    results = ranks(2, "workers.cp_transformers:cp_equivalence", model_name="flux", config=config, enable=False)
    assert all(r["diff"] == 0.0 for r in results)  # the diff alone cannot tell a no-op from a parallel run
    problems = split_problems(results[0]["split_reference"], [r["split"] for r in results], config)
    assert any("image_tokens per rank [16, 16], expected [8, 8]" in p for p in problems), problems
    assert any("text_tokens per rank [8, 8], expected [4, 4]" in p for p in problems), problems
    assert any("not fewer than one process's 24" in p for p in problems), problems
    assert any("funcol.all_to_all_single issued in 0 of 2 attention calls" in p for p in problems), problems
    with pytest.raises(AssertionError, match="the work was not split"):
        assert_split(results, config)


def test_dp_groups_when_degrees_use_part_of_the_world(ranks):
    """ulysses_size=2 on 4 ranks: two groups each run the model; every rank still gets the full result."""
    results = ranks(4, "workers.cp_transformers:cp_equivalence", model_name="flux", config={"ulysses_size": 2})
    assert all(r["diff"] <= CP_FP32 for r in results)
    assert_split(results, {"ulysses_size": 2})  # each group of 2 splits the sequence in 2


@pytest.mark.parametrize("world,config,seq,text", [
    pytest.param(2, {"ulysses_size": 2}, 16, 8, id="w2-ulysses"),
    pytest.param(4, {"ulysses_size": 4, "ulysses_anything": True}, 13, 7, id="w4-ulysses-anything-odd"),
])
def test_padded_text_mask_under_ulysses(ranks, expect_cp, world, config, seq, text):
    """A padded prompt mask must be gathered exactly (diffusers' uneven mask gather misplaces padding)."""
    from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks

    if not context_parallel_attention_takes_masks() or not _qwen_takes_mask():
        pytest.skip("this diffusers release's QwenImage/CP attention takes no padding mask (refusal tested below)")
    results = expect_cp(ranks, world, config, "workers.cp_transformers:cp_equivalence", model_name="qwenimage",
                        seq=seq, text=text, model_kwargs={"heads": 4}, input_kwargs={"text_padding": 3})
    if results is None:
        return
    assert all(r["diff"] <= CP_FP32 for r in results), [r["diff"] for r in results]
    assert_split(results, config)


def _qwen_takes_mask():
    import inspect

    from diffusers import QwenImageTransformer2DModel

    return "txt_seq_lens" not in inspect.signature(QwenImageTransformer2DModel.forward).parameters


def test_padded_text_mask_under_ring_is_refused_on_every_rank(ranks):
    from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks
    from diffpar.testing import RankFailure

    if not _qwen_takes_mask():
        pytest.skip("this diffusers release's QwenImage takes text lengths, not a padding mask")
    with pytest.raises(RankFailure) as err:
        ranks(2, "workers.cp_transformers:cp_equivalence", model_name="qwenimage", config={"ring_size": 2},
              seq=16, text=8, input_kwargs={"text_padding": 3})
    text = str(err.value)
    assert "2 rank(s) failed" in text
    if context_parallel_attention_takes_masks():
        assert "ring attention with a padding attention mask" in text and "Use ulysses_size" in text
    else:
        assert "cannot apply attention masks in context-parallel attention" in text


def test_split_probe_restores_everything_it_wrapped():
    """The probe is removable: collectives and modules are exactly as before, also when the call raises."""
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.distributed import distributed_c10d

    from diffpar.testing import tiny_transformers
    from diffpar.testing.probes import C10D_NAMES, FUNCOL_NAMES, SplitProbe

    def bindings():
        found = {f"dist.{n}": getattr(dist, n, None) for n in C10D_NAMES}
        found.update({f"c10d.{n}": getattr(distributed_c10d, n, None) for n in C10D_NAMES})
        found.update({f"funcol.{n}": getattr(funcol, n, None) for n in FUNCOL_NAMES})
        return found

    def hooks(model):
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    model, make_inputs = tiny_transformers.build("flux")
    before, hooks_before = bindings(), hooks(model)
    with torch.no_grad(), SplitProbe(model) as probe:
        assert bindings() != before and hooks(model) > hooks_before  # it did wrap and hook
        model(**make_inputs(seq=16, text=8))
    assert probe.summary()["tokens"] == [24] and probe.summary()["attention_calls"] == 2
    assert bindings() == before and hooks(model) == hooks_before
    with pytest.raises(RuntimeError, match="boom"), SplitProbe(model):
        raise RuntimeError("boom")
    assert bindings() == before and hooks(model) == hooks_before
