"""Whole video pipelines on 2 ranks (issue 13, item 4): the transformer context parallel, every text encoder the
pipeline builds tensor parallel and the VAE split, the video within PIPELINE_FP32 of the same pipeline in one
process. Every test proves the split: the transformer's attention saw a shard and issued its collectives
(assert_split), each text encoder holds a share of its weights, the VAE ran its decode (and encode) split."""
import pytest
from tolerances import PIPELINE_FP32

from diffpar.testing import tiny_video_pipelines
from diffpar.testing.probes import assert_split

ULYSSES = {"ulysses_size": 2}


def _needs(kind):
    name = tiny_video_pipelines.PIPELINE_CLASS[kind]
    return pytest.mark.skipif(not tiny_video_pipelines.available(kind), reason=f"this diffusers has no {name}")


def _check(results, config, encoders=(), encode=False, **split_options):
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"], r["scale"])
        assert r["ranks_identical"], "every rank must hold the same video"
        for name in encoders:  # tensor parallel: each rank holds a share of every attention's heads (and of the
            share = r["text_encoders"][name]  # MLPs: fewer bytes; embeddings stay whole, so tiny models keep > 1/2)
            assert share["bytes_ratio"] < 0.75, (name, share)
            for layout in share["heads_per_rank"]:  # per attention layout: (query heads, KV heads) on each rank
                assert len(layout) == len(results) and all(q < sum(h[0] for h in layout) for q, _ in layout), share
        calls = r["vae_calls"]
        assert calls["decode"]["split"] >= 1 and calls["decode"]["whole"] == 0, calls
        if encode:
            assert calls["encode"]["split"] >= 1 and calls["encode"]["whole"] == 0, calls
    assert_split(results, config, **split_options)  # every transformer forward ran on a shard


@_needs("wan_i2v")
@pytest.mark.compat
def test_wan_image_to_video(ranks):
    """WanImageToVideoPipeline (Wan 2.1 I2V): transformer Ulysses 2, UMT5 tensor parallel, the first frame's VAE
    encode and the final decode split by rows (vae_split_min_rows=0 so the 4 latent rows split). Its CLIP image
    encoder stays whole on every rank (a 32 px image, 17 tokens: nothing worth splitting; diffpar has no vision-tower
    plan)."""
    config = dict(ULYSSES, vae_split_min_rows=0)
    results = ranks(2, "workers.video_pipelines:video_equivalence", kind="wan_i2v", config=config,
                    extra=["text_encoder", "vae"], timeout=300)
    _check(results, ULYSSES, encoders=["text_encoder"], encode=True)


def _needs_plan(class_name):
    """diffpar's context-parallel plan for this transformer class (some live on branches not yet merged)."""
    from diffpar.families import catalog  # noqa: F401 - registers every plan
    from diffpar.families.registry import supported_cp_models

    return pytest.mark.skipif(class_name not in supported_cp_models(),
                              reason=f"this diffpar has no context-parallel plan for {class_name}")


@_needs("cogvideox")
@_needs_plan("CogVideoXTransformer3DModel")
@pytest.mark.compat
def test_cogvideox_text_to_video(ranks):
    """CogVideoXPipeline: transformer Ulysses 2 (joint text + video attention), T5 tensor parallel, the causal
    CogVideoX VAE decode split by rows (8 latent rows, frame batches carrying their conv caches)."""
    config = dict(ULYSSES, vae_split_min_rows=0)
    results = ranks(2, "workers.video_pipelines:video_equivalence", kind="cogvideox", config=config,
                    extra=["text_encoder", "vae"], timeout=300)
    _check(results, ULYSSES, encoders=["text_encoder"])


@_needs("cogvideox_i2v")
@_needs_plan("CogVideoXTransformer3DModel")
@pytest.mark.compat
def test_cogvideox_image_to_video(ranks):
    """CogVideoXImageToVideoPipeline: as text-to-video, plus the first frame's VAE encode split by rows."""
    config = dict(ULYSSES, vae_split_min_rows=0)
    results = ranks(2, "workers.video_pipelines:video_equivalence", kind="cogvideox_i2v", config=config,
                    extra=["text_encoder", "vae"], timeout=300)
    _check(results, ULYSSES, encoders=["text_encoder"], encode=True)


@_needs("ltx_i2v")
@pytest.mark.compat
def test_ltx_image_to_video(ranks):
    """LTXImageToVideoPipeline: transformer Ulysses 2, T5 tensor parallel, the first frame's encode and the
    timestep-conditioned decode of the LTX VAE split by rows."""
    config = dict(ULYSSES, vae_split_min_rows=0)
    results = ranks(2, "workers.video_pipelines:video_equivalence", kind="ltx_i2v", config=config,
                    extra=["text_encoder", "vae"], timeout=300)
    _check(results, ULYSSES, encoders=["text_encoder"], encode=True)


@_needs("skyreels_v2_df")
@pytest.mark.compat
def test_skyreels_v2_diffusion_forcing(ranks):
    """SkyReelsV2DiffusionForcingPipeline, asynchronous (ar_step=1, causal blocks of one latent frame: a timestep
    per frame): transformer Ulysses 2, UMT5 tensor parallel, the Wan VAE decode split by rows."""
    config = dict(ULYSSES, vae_split_min_rows=0)
    results = ranks(2, "workers.video_pipelines:video_equivalence", kind="skyreels_v2_df", config=config,
                    extra=["text_encoder", "vae"], timeout=300)
    _check(results, ULYSSES, encoders=["text_encoder"])


@_needs("wan_vace")
@pytest.mark.compat
def test_wan_vace(ranks):
    """WanVACEPipeline with a conditioning video, its mask and a reference image: transformer (and its VACE blocks)
    Ulysses 2, UMT5 tensor parallel, the conditioning encodes and the decode split by rows."""
    config = dict(ULYSSES, vae_split_min_rows=0)
    results = ranks(2, "workers.video_pipelines:video_equivalence", kind="wan_vace", config=config,
                    extra=["text_encoder", "vae"], timeout=300)
    _check(results, ULYSSES, encoders=["text_encoder"], encode=True)


@_needs("hunyuan_video15")
@_needs_plan("HunyuanVideo15Transformer3DModel")
@pytest.mark.compat
def test_hunyuan_video15_text_to_video(ranks):
    """HunyuanVideo15Pipeline: transformer Ulysses 2, both text encoders (Qwen2.5-VL language model and the ByT5
    glyph encoder) tensor parallel, the HunyuanVideo 1.5 VAE decode split by rows."""
    config = dict(ULYSSES, vae_split_min_rows=0)
    results = ranks(2, "workers.video_pipelines:video_equivalence", kind="hunyuan_video15", config=config,
                    extra=["text_encoder", "text_encoder_2", "vae"], timeout=300)
    _check(results, ULYSSES, encoders=["text_encoder", "text_encoder_2"], text_cut=True)


@_needs("kandinsky5_t2v")
@_needs_plan("Kandinsky5Transformer3DModel")
@pytest.mark.compat
def test_kandinsky5_text_to_video(ranks):
    """Kandinsky5T2VPipeline: transformer Ulysses 2 (visual self-attention split; prompt blocks and cross-attention
    on the whole prompt), Qwen2.5-VL and CLIP tensor parallel, the HunyuanVideo VAE decode split by rows."""
    config = dict(ULYSSES, vae_split_min_rows=0)
    results = ranks(2, "workers.video_pipelines:video_equivalence", kind="kandinsky5_t2v", config=config,
                    extra=["text_encoder", "text_encoder_2", "vae"], timeout=300)
    _check(results, ULYSSES, encoders=["text_encoder", "text_encoder_2"])


@_needs("hunyuan_video15_i2v")
@_needs_plan("HunyuanVideo15Transformer3DModel")
@pytest.mark.compat
def test_hunyuan_video15_image_to_video(ranks):
    """HunyuanVideo15ImageToVideoPipeline: as text-to-video, plus the first frame's VAE encode split by rows. Its
    SigLIP image encoder stays whole on every rank (4 image tokens here; diffpar has no vision-tower plan)."""
    config = dict(ULYSSES, vae_split_min_rows=0)
    results = ranks(2, "workers.video_pipelines:video_equivalence", kind="hunyuan_video15_i2v", config=config,
                    extra=["text_encoder", "text_encoder_2", "vae"], timeout=300)
    _check(results, ULYSSES, encoders=["text_encoder", "text_encoder_2"], encode=True, text_cut=True)
