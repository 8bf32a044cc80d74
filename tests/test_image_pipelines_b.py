"""Whole text-to-image pipelines on 2 ranks (issue 12 item 3 / issue 13 item 4): HiDream-I1, Hunyuan-DiT,
CogView3-Plus, LongCat-Image, Ovis-Image, Bria, HunyuanImage 2.1. The transformer context parallel (Ulysses 2, an
odd prompt length), every text encoder the pipeline builds tensor parallel, the VAE decode split; the image within
PIPELINE_FP32 of the same pipeline in one process, the same on every rank and on a second call. Every test proves
the split: the transformer's attention saw a shard and issued its collectives (assert_split), each text encoder
holds a share of its weights and heads, the VAE decoded split."""
import pytest
from tolerances import PIPELINE_FP32

import diffusers
from availability import diffusers_has, needs_uneven_split

from diffpar.testing.probes import assert_split
from workers.image_pipelines_b import KINDS

pytestmark = needs_uneven_split()  # odd lengths are the point of these tests

ULYSSES = {"ulysses_size": 2}


def _check(results, config, **split_options):
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"], r["scale"])
        assert r["repeat_diff"] == 0.0, "a second call must give the same image (no state left between calls)"
        assert r["ranks_identical"], "every rank must hold the same image"
        assert r["text_encoders"], "every pipeline here has a text encoder"
        for name, share in r["text_encoders"].items():  # tensor parallel: fewer weight bytes, a share of the heads
            assert share["bytes_ratio"] < 0.75, (name, share)  # (embeddings stay whole: tiny models keep > 1/2)
            for layout in share["heads_per_rank"]:  # per attention layout: (query heads, KV heads) on each rank
                assert len(layout) == len(results) and all(q < sum(h[0] for h in layout) for q, _ in layout), share
        calls = r["vae_calls"]
        assert calls["decode"]["split"] >= 1 and calls["decode"]["whole"] == 0, calls
    assert_split(results, config, **split_options)  # every transformer forward ran on a shard


def _case(kind):
    name = KINDS[kind].pipeline_class
    return pytest.param(kind, marks=pytest.mark.skipif(not diffusers_has(name),
                                                      reason=f"diffusers {diffusers.__version__} has no {name}"))


# hunyuan_dit: its BERT and its T5 are both tensor parallel.
KIND_NAMES = ["hidream", "hunyuan_dit", "cogview3plus", "longcat_image", "ovis_image", "bria", "hunyuan_image"]


@pytest.mark.parametrize("kind", [_case(kind) for kind in KIND_NAMES])
def test_text_to_image_whole_world(ranks, kind):
    results = ranks(2, "workers.image_pipelines_b:pipeline_equivalence", kind=kind, config=ULYSSES, timeout=300)
    _check(results, ULYSSES)
    assert set(results[0]["text_encoders"]) == {n for n in KINDS[kind].parallel if n.startswith("text_encoder")}
