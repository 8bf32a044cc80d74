"""Image-conditioned pipelines end to end on 2 ranks: transformer context parallel, text encoders tensor parallel,
VAE split for decode AND encode (the input image goes through the split encode), vs the same pipeline in one
process."""
import pytest
from tolerances import PIPELINE_FP32


from diffpar.testing.probes import assert_split
from availability import needs


def _check(results, config):
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["diff"], r["scale"])
        assert r["repeat_diff"] == 0.0, "a second call must give the same image (no state left between calls)"
        assert r["ranks_identical"], "every rank must hold the same image"
        calls = r["vae_calls"]
        assert calls["encode"]["split"] >= 1, calls  # the input image was encoded split
        assert calls["decode"]["split"] >= 1, calls
    assert_split(results, config)  # every denoising step's transformer forward ran on a shard


# rank_seeds: rank r passes generator seed r, relying on diffpar to make every rank use rank 0's randomness.
# FluxFill samples its masked-image latents (VAE encode posterior) with the generator outside prepare_latents:
# rank seeds there in test_fill_with_rank_seeds_needs_encode_sample_broadcast.
CASES = [
    pytest.param("flux-kontext", True, marks=[pytest.mark.compat, needs("FluxKontextPipeline")]),
    pytest.param("flux-fill", False, marks=[pytest.mark.compat, needs("FluxFillPipeline")]),
    pytest.param("flux-img2img", True, marks=[pytest.mark.compat, needs("FluxImg2ImgPipeline")]),
    pytest.param("sd3-img2img", True, marks=[pytest.mark.compat, needs("StableDiffusion3Img2ImgPipeline")]),
    pytest.param("flux2-reference", True, marks=[pytest.mark.compat, needs("Flux2Pipeline")]),
    pytest.param("qwenimage-inpaint", True, marks=[pytest.mark.compat, needs("QwenImageInpaintPipeline")]),
    # not compat-marked: 1.5-2 min each (a 1024 px VAE encode per input image), not yet run on 0.36.0
    pytest.param("qwenimage-edit", True, marks=needs("QwenImageEditPipeline")),
    pytest.param("qwenimage-edit-plus", True, marks=needs("QwenImageEditPlusPipeline")),
]


@pytest.mark.parametrize("kind,rank_seeds", CASES)
def test_image_pipeline_whole_world(ranks, kind, rank_seeds):
    config = {"ulysses_size": 2}
    results = ranks(2, "workers.image_pipelines:pipeline_equivalence", kind=kind, config=config,
                    rank_seeds=rank_seeds, timeout=300)
    _check(results, config)


@needs("FluxFillPipeline")
def test_fill_with_rank_seeds_needs_encode_sample_broadcast(ranks):
    """FluxFillPipeline.prepare_mask_latents samples the VAE posterior with the generator after prepare_latents:
    the generator gets rank 0's state at prepare_latents, so those samples agree too."""
    config = {"ulysses_size": 2}
    results = ranks(2, "workers.image_pipelines:pipeline_equivalence", kind="flux-fill", config=config,
                    rank_seeds=True, timeout=300)
    _check(results, config)
