"""Whole video pipelines on 2 ranks, second set (issue 13, item 4): the transformer context parallel (Ulysses 2,
an odd prompt length), every text encoder the pipeline builds tensor parallel and the VAE split (decode, and encode
where the pipeline encodes an image), the video within PIPELINE_FP32 of the same pipeline in one process. Every test
proves the split: the transformer's attention saw a shard and issued its collectives (assert_split), each text
encoder holds a share of its weights, the VAE ran its decode (and encode) split."""
import pytest
from tolerances import PIPELINE_FP32
from workers import video_pipelines_b

from diffpar.testing.probes import assert_split
from availability import needs_uneven_split

pytestmark = needs_uneven_split()  # odd lengths are the point of these tests

ULYSSES = {"ulysses_size": 2}
# vae_split_min_rows=0: the tiny latents (4 rows) split too.
CONFIG = dict(ULYSSES, vae_split_min_rows=0)


def _needs(kind):
    name = video_pipelines_b.PIPELINE_CLASS[kind]
    return pytest.mark.skipif(not video_pipelines_b.available(kind), reason=f"this diffusers has no {name}")


def _check(results, encoders=(), encode=False, audio=False, **split_options):
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"], r["scale"])
        assert r["ranks_identical"], "every rank must hold the same video"
        if audio:  # the audio branch attends to the split video tokens: its waveform must match too
            assert r["audio_diff"] is not None and r["audio_diff"] <= PIPELINE_FP32, (r["rank"], r["audio_diff"])
        for name in encoders:  # each rank holds a share of every attention's heads and MLP (embeddings stay whole)
            share = r["text_encoders"][name]
            assert share["bytes_ratio"] < 0.75, (name, share)
            for layout in share["heads_per_rank"]:  # per attention layout: (query heads, KV heads) on each rank
                assert len(layout) == len(results) and all(q < sum(h[0] for h in layout) for q, _ in layout), share
        calls = r["vae_calls"]
        assert calls["decode"]["split"] >= 1 and calls["decode"]["whole"] == 0, calls
        if encode:
            assert calls["encode"]["split"] >= 1 and calls["encode"]["whole"] == 0, calls
    assert_split(results, ULYSSES, **split_options)  # every transformer forward ran on a shard


def _run(ranks, kind, extra):
    return ranks(2, "workers.video_pipelines_b:video_equivalence", kind=kind, config=CONFIG, extra=extra,
                 timeout=300)


@_needs("ltx2_i2v")
@pytest.mark.compat
def test_ltx2_image_to_video(ranks):
    """LTX2ImageToVideoPipeline: transformer Ulysses 2 (video tokens split; audio and prompt whole), Gemma 3 (the
    language model inside Gemma3ForConditionalGeneration) tensor parallel, the first frame's encode and the decode
    of the LTX-2 VAE split by rows. The connectors, audio VAE and vocoder stay whole on every rank."""
    results = _run(ranks, "ltx2_i2v", ["text_encoder", "vae"])
    _check(results, encoders=["text_encoder"], encode=True, audio=True)


@_needs("hunyuan_video")
@pytest.mark.compat
def test_hunyuan_video_text_to_video(ranks):
    """HunyuanVideoPipeline: transformer Ulysses 2 (video and prompt tokens split; the plan first cuts the refined
    prompt's right padding, so text_cut), Llama and CLIP tensor parallel, the HunyuanVideo VAE decode split by rows."""
    results = _run(ranks, "hunyuan_video", ["text_encoder", "text_encoder_2", "vae"])
    _check(results, encoders=["text_encoder", "text_encoder_2"], text_cut=True)


@_needs("chronoedit")
@pytest.mark.compat
def test_chronoedit(ranks):
    """ChronoEditPipeline: transformer Ulysses 2 (video tokens split; prompt and CLIP image context whole), UMT5
    tensor parallel, the input image's Wan VAE encode and the decode split by rows. Its CLIP image encoder stays
    whole on every rank (10 tokens here; diffpar has no vision-tower plan)."""
    results = _run(ranks, "chronoedit", ["text_encoder", "vae"])
    _check(results, encoders=["text_encoder"], encode=True)


@_needs("helios")
@pytest.mark.compat
def test_helios_text_to_video(ranks):
    """HeliosPipeline: transformer Ulysses 2 (current and history tokens split; prompt whole), UMT5 tensor
    parallel, the Wan VAE decode split by rows."""
    results = _run(ranks, "helios", ["text_encoder", "vae"])
    _check(results, encoders=["text_encoder"])


@_needs("ltx2")
@pytest.mark.compat
def test_ltx2_text_to_video(ranks):
    """LTX2Pipeline (text to video with audio): transformer Ulysses 2 (video tokens split; audio and prompt whole),
    Gemma 3 tensor parallel, the LTX-2 VAE decode split by rows, the audio VAE's decode split along time (the
    mel spectrogram's rows). Connectors and vocoder stay whole."""
    results = _run(ranks, "ltx2", ["text_encoder", "vae", "audio_vae"])
    _check(results, encoders=["text_encoder"], audio=True)
    for r in results:
        calls = r["audio_vae_calls"]
        assert calls["decode"]["split"] >= 1 and calls["decode"]["whole"] == 0, calls


@_needs("wan_animate")
@pytest.mark.compat
def test_wan_animate(ranks):
    """WanAnimatePipeline (animate mode, one segment): transformer Ulysses 2 (video tokens split, the face adapters
    attending per frame on each rank's shard; prompt and CLIP image context whole), UMT5 tensor parallel, the Wan
    VAE's encodes (reference image, pose video) and decode split by rows. Its CLIP image encoder and the motion
    encoder stay whole on every rank."""
    results = _run(ranks, "wan_animate", ["text_encoder", "vae"])
    _check(results, encoders=["text_encoder"], encode=True)
