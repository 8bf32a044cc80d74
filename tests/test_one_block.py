"""Models with ONE block (a depth users pick for small or distilled variants): a CP plan that splits the tokens as
they enter block 0 and gathers them after the last block must keep both entries, though they name the same block
(a plan holds one entry per name: the gather goes under the stack's wildcard). Each family whose plan comes from
`first_block_split.blocks_split_plan` with the gather after its last block runs at depth 1, Ulysses 2, against
one process, the split proven. (ACE-Step's plan is the same, but its one layer would be a sliding-window layer,
whose keys are gathered rather than exchanged all-to-all, so the probe has no attention to prove the split by.)"""
import pytest
from tolerances import CP_FP32

from diffpar.testing.coverage import class_available
from diffpar.testing.probes import assert_split

ONE_BLOCK = [
    ("longcat_audio_dit", "LongCatAudioDiTTransformer"),
    ("krea2", "Krea2Transformer2DModel"),
    ("minimax_music3", "MiniMaxMusic3Transformer1DModel"),
    ("stable_audio3", "StableAudio3DiTModel"),
]


@pytest.mark.parametrize("builder,class_name", ONE_BLOCK, ids=[b for b, _ in ONE_BLOCK])
def test_one_block_model_is_split_and_gathered(ranks, expect_cp, builder, class_name):
    if not class_available(class_name):
        pytest.skip(f"this diffusers release has no {class_name}")
    config = {"ulysses_size": 2}
    results = expect_cp(ranks, 2, config, "workers.cp_transformers:cp_equivalence", model_name=builder,
                        seq=16, text=8, model_kwargs={"heads": 4, "layers": 1}, input_kwargs={})
    if results is None:
        return  # the installed diffusers cannot run this layout; every rank said so clearly
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)
