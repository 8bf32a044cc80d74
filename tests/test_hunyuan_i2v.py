"""HunyuanVideo image-to-video ("token_replace") under context parallelism, beyond the family harness's layouts:
the per-rank first-frame count against the split's own cut, padded prompts of different lengths in one batch
(the Ulysses key mask together with the first-frame modulation), and ranks lying wholly inside the first frame."""
import pytest
import torch
from tolerances import CP_FP32

from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks
from diffpar.families.transformers.hunyuan_video import first_frame_tokens_here
from diffpar.testing.probes import assert_split

_NEEDS_MASKS = pytest.mark.skipif(not context_parallel_attention_takes_masks(),
                                  reason="padded prompts need a release whose CP attention takes masks (0.37+)")


@pytest.mark.parametrize("video_tokens", [15, 16, 21, 24, 48])
@pytest.mark.parametrize("shards", [2, 3, 4])
def test_first_frame_count_matches_the_split(video_tokens, shards):
    # The split hooks cut with chunk (even) or tensor_split (uneven): for an even length they agree.
    parts = torch.arange(video_tokens).tensor_split(shards)
    for first in range(0, video_tokens + 1):
        counts = [first_frame_tokens_here(first, video_tokens, r, shards) for r in range(shards)]
        assert counts == [int((part < first).sum()) for part in parts], (first, counts)
        assert sum(counts) == first


def test_first_frame_count_examples():
    # 3 frames of 8 tokens on 4 ranks (6 each): the first frame ends inside rank 1's shard.
    assert [first_frame_tokens_here(8, 24, r, 4) for r in range(4)] == [6, 2, 0, 0]
    # 2 frames of 12 tokens on 4 ranks: ranks 0 and 1 lie wholly inside the first frame.
    assert [first_frame_tokens_here(12, 24, r, 4) for r in range(4)] == [6, 6, 0, 0]


@pytest.mark.parametrize("world,config,input_kwargs,batch", [
    pytest.param(2, {"ulysses_size": 2}, {"valid": [5, 8]}, 2, id="w2-ulysses-padded-batch", marks=_NEEDS_MASKS),
    pytest.param(4, {"ulysses_size": 4}, {"frames": 2, "first_frame_tokens": 12}, 1, id="w4-ulysses-ranks-inside"),
    pytest.param(4, {"ring_size": 4}, {"frames": 2, "first_frame_tokens": 12}, 1, id="w4-ring-ranks-inside"),
])
def test_token_replace_matches_one_process(ranks, expect_cp, world, config, input_kwargs, batch):
    results = expect_cp(ranks, world, config, "workers.cp_transformers:cp_equivalence",
                        model_name="hunyuan_video_i2v", batch=batch, model_kwargs={"heads": 4},
                        input_kwargs=input_kwargs)
    if results is None:
        return  # the installed diffusers cannot run this layout; every rank said so clearly
    for r in results:
        assert r["diff"] <= CP_FP32, (r["rank"], r["diff"])
        assert r["detach_diff"] == 0.0
    assert_split(results, config)
