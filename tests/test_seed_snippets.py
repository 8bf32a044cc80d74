"""The seed's snippets run as written, with `import cache_dit` changed to `import diffpar as cache_dit`."""
import pytest
from tolerances import PIPELINE_FP32

from diffpar.testing.probes import assert_split

pytestmark = pytest.mark.compat


@pytest.mark.parametrize("which", ["tp-text-encoder", "cp-text-encoder", "cp-text-encoder-vae", "zimage-controlnet"])
def test_seed_snippet(ranks, which):
    import diffusers

    if which == "zimage-controlnet" and not hasattr(diffusers, "ZImageControlNetPipeline"):
        pytest.skip("this diffusers release has no ZImageControlNetPipeline (added in 0.37)")
    results = ranks(2, "workers.seed_snippets:snippet", which=which, timeout=300)
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, r
    # What each snippet asks for: the transformer (and the ControlNet) split on every step, every rank.
    config = {"tp_size": 2} if which == "tp-text-encoder" else {"ulysses_size": 2}
    assert_split(results, config)
    if which == "zimage-controlnet":
        assert_split(results, config, key="split_controlnet")


def test_tensor_parallel_split_check_fails_without_parallelism():
    """The check the tp snippet passes fails on what a no-op gives: one process's evidence on every rank."""
    from diffpar.testing.probes import split_problems

    one_process = {"attention": "transformer_blocks.0.attn", "tokens": [80, 80], "image_tokens": [64, 64],
                   "text_tokens": [16, 16], "heads": [4, 4], "attention_calls": 4, "attention_calls_with": {},
                   "collectives": {}, "group_sizes": {}}
    problems = split_problems(one_process, [one_process, one_process], {"tp_size": 2})
    assert any("an all-reduce in 0 attention calls over 2 forwards" in p for p in problems), problems
    assert any("0 all-reduces for 4 attention calls" in p for p in problems), problems
