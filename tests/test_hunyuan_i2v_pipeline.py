"""HunyuanVideoImageToVideoPipeline (image_condition_type="token_replace") end to end on 2 ranks (issue 13, items 1
and 4): the transformer Ulysses 2 or Ring 2 with the first latent frame's tokens (16 of 48; 24 per rank) modulated apart on
the rank that holds them, the Llava and CLIP text encoders tensor parallel, the first frame's VAE encode and the
final decode split by rows; the video within PIPELINE_FP32 of the same pipeline in one process, on every rank.
The split is proven: the transformer's attention saw a shard and issued its collectives, each text encoder holds a
share of its weights, the VAE ran split."""
import pytest
from availability import diffusers_has, needs_uneven_split
from tolerances import PIPELINE_FP32

from diffpar.testing.probes import assert_split

pytestmark = needs_uneven_split()  # odd lengths are the point of these tests


def _has_pipeline():
    return diffusers_has("HunyuanVideoImageToVideoPipeline")


@pytest.mark.skipif(not _has_pipeline(), reason="this diffusers has no HunyuanVideoImageToVideoPipeline")
@pytest.mark.compat
@pytest.mark.parametrize("cp", [{"ulysses_size": 2}, {"ring_size": 2}], ids=["ulysses", "ring"])
def test_hunyuan_video_image_to_video_token_replace(ranks, expect_cp, cp):
    config = dict(cp, vae_split_min_rows=0)
    results = expect_cp(ranks, 2, config, "workers.hunyuan_i2v_pipeline:pipeline_equivalence", timeout=300)
    if results is None:
        return  # the installed diffusers cannot run this layout; every rank said so clearly
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"], r["scale"])
        assert r["ranks_identical"], "every rank must hold the same video"
        for name in ("text_encoder", "text_encoder_2"):
            share = r["text_encoders"][name]
            assert share["bytes_ratio"] < 0.75, (name, share)
            for layout in share["heads_per_rank"]:  # (query heads, KV heads) on each rank, per attention layout
                assert len(layout) == 2 and all(q < sum(h[0] for h in layout) for q, _ in layout), share
        calls = r["vae_calls"]
        assert calls["encode"]["split"] >= 1 and calls["encode"]["whole"] == 0, calls
        assert calls["decode"]["split"] >= 1 and calls["decode"]["whole"] == 0, calls
    assert_split(results, cp, text_cut=True)  # every transformer forward ran on a shard
