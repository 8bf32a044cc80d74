"""Whole image pipelines on 2 ranks (issue 12 item 3 / issue 13 item 4): Bria FIBO, Bria FIBO 2 (generating and
editing), JoyImage Edit, JoyImage Edit Plus. The transformer context parallel (Ulysses 2, an odd prompt length), every text encoder the
pipeline builds tensor parallel, the VAE decode split (and the edit pipelines' input-image encode); the image within
PIPELINE_FP32 of the same pipeline in one process, the same on every rank and on a second call. Every test proves the
split: the transformer's attention saw a shard and issued its collectives (assert_split), each text encoder holds a
share of its weights and heads, the VAE decoded (and encoded) split."""
import pytest
from tolerances import PIPELINE_FP32

import diffusers
from availability import diffusers_has, needs_uneven_split

from diffpar.testing.probes import assert_split
from workers.image_pipelines_e import KINDS

pytestmark = needs_uneven_split()  # odd lengths are the point of these tests

ULYSSES = {"ulysses_size": 2}
# Kinds whose input image goes through the VAE encode (split too).
ENCODING = {"bria_fibo2_edit", "joyimage_edit", "joyimage_edit_plus"}
# Kinds whose probed attention's sequence is even whatever the sizes: FIBO 2 edits an image cropped to the output's
# size, and its refiner holds the output's and that image's tokens (15 + 15); bria_fibo2 covers the odd split.
EVEN_PROBED = {"bria_fibo2_edit"}


def _check(results, kind, config):
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"], r["scale"])
        assert r["repeat_diff"] == 0.0, "a second call must give the same image (no state left between calls)"
        assert r["ranks_identical"], "every rank must hold the same image"
        # detach reports only the sharded text encoder (it must be reloaded: keep_original_text_encoders is off)
        assert all(p.startswith("text_encoder") for p in r["detach_problems"]), r["detach_problems"]
        assert set(r["text_encoders"]) == {n for n in KINDS[kind].parallel if n.startswith("text_encoder")}
        assert r["text_encoders"], "every pipeline here has a text encoder"
        for name, share in r["text_encoders"].items():  # tensor parallel: fewer weight bytes, a share of the heads
            assert share["bytes_ratio"] < 0.75, (name, share)  # (embeddings stay whole: tiny models keep > 1/2)
            for layout in share["heads_per_rank"]:  # per attention layout: (query heads, KV heads) on each rank
                assert len(layout) == len(results) and all(q < sum(h[0] for h in layout) for q, _ in layout), share
        # the probed (first split) attention's sequence is odd: FIBO's 13 prompt + 16 image tokens, FIBO 2's
        # refiner over 15 image tokens, JoyImage Edit's 2 x 9 image tokens after its prompt (191), Edit Plus's
        # 9 + 6 + 6 after its prompt (234)
        if kind not in EVEN_PROBED:
            assert r["split_reference"]["tokens"][0] % 2 == 1, r["split_reference"]
        calls = r["vae_calls"]
        assert calls["decode"]["split"] >= 1 and calls["decode"]["whole"] == 0, calls
        if kind in ENCODING:  # the input image was encoded split
            assert calls["encode"]["split"] >= 1 and calls["encode"]["whole"] == 0, calls
    assert_split(results, config)  # every transformer forward ran on a shard


def _case(kind):
    name = KINDS[kind].pipeline_class
    return pytest.param(kind, marks=pytest.mark.skipif(not diffusers_has(name),
                                                      reason=f"diffusers {diffusers.__version__} has no {name}"))


KIND_NAMES = ["bria_fibo", "bria_fibo2", "bria_fibo2_edit", "joyimage_edit", "joyimage_edit_plus"]


@pytest.mark.parametrize("kind", [_case(kind) for kind in KIND_NAMES])
def test_image_pipeline_whole_world(ranks, kind):
    results = ranks(2, "workers.image_pipelines_e:pipeline_equivalence", kind=kind, config=ULYSSES, timeout=300)
    _check(results, kind, ULYSSES)
