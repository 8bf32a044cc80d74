"""Image pipelines end to end on 2 ranks (Lumina-Next, DiT, Ideogram 4; OmniGen: tests/test_omnigen_pipeline.py,
which runs without torchvision): the transformer context parallel
(Ulysses 2; odd lengths where the pipeline allows them), every text encoder tensor parallel, the VAE decode split,
vs the same pipeline in one process. Rank r passes generator seed r (DiT aside, see below): diffpar's latent
broadcast must make every rank use rank 0's noise."""
import pytest
from tolerances import PIPELINE_FP32

from availability import needs, needs_uneven_split

from diffpar.testing.probes import assert_split

pytestmark = needs_uneven_split()  # odd lengths are the point of these tests


# Kinds with a text encoder (made tensor parallel); DiT has class labels only.
WITH_TEXT_ENCODER = {"lumina-next", "ideogram4"}
# Kinds whose probed (first) attention holds an odd token count: DiT's 5 x 5 patch grid. Lumina-Next pads its prompt
# to a multiple of 8 itself.
# Ideogram 4's sequence: the prompt left-padded to max_sequence_length 35, then 16 image tokens (51).
ODD_TOKENS_PROBED = {"dit", "ideogram4"}

# Pipelines that draw their initial noise inline (no prepare_latents): diffpar's latent broadcast cannot reach them,
# so every rank passes the same seed (see test_dit_rank_seeds below).
NO_PREPARE_LATENTS = {"dit"}

CASES = [
    pytest.param("lumina-next", marks=needs("LuminaPipeline")),
    pytest.param("dit", marks=needs("DiTPipeline")),
    pytest.param("ideogram4", marks=needs("Ideogram4Pipeline")),
]


@pytest.mark.parametrize("kind", CASES)
def test_image_pipeline_whole_world(ranks, kind):
    config = {"ulysses_size": 2}
    results = ranks(2, "workers.image_pipelines_d:pipeline_equivalence", kind=kind, config=config, timeout=300,
                    rank_seeds=kind not in NO_PREPARE_LATENTS)
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["diff"], r["scale"])
        assert r["repeat_diff"] == 0.0, "a second call must give the same image (no state left between calls)"
        assert r["ranks_identical"], "every rank must hold the same image"
        # detach reports only the sharded text encoder (it must be reloaded: keep_original_text_encoders is off)
        assert all(p.startswith("text_encoder") for p in r["detach_problems"]), r["detach_problems"]
        assert r["vae_calls"]["decode"]["split"] >= 1, r["vae_calls"]  # the image was decoded split
        if kind in ODD_TOKENS_PROBED:
            assert r["split_reference"]["image_tokens"][0] % 2 == 1, r["split_reference"]
        if kind in WITH_TEXT_ENCODER:
            assert r["text_encoders"], "the pipeline's text encoder must be made parallel"
        for name, counts in r["text_encoders"].items():  # each rank holds a shard of the encoder, not all of it
            assert counts["after"] < counts["before"], (name, counts)
    assert_split(results, config)  # every denoising step's transformer attention ran on a token shard


@needs("DiTPipeline")
def test_dit_rank_seeds_get_rank_0s_noise(ranks):
    """DiTPipeline draws its noise inline with randn_tensor: with a seed per rank (the worker's default) the
    generators get rank 0's state at the call's start, so the image is rank 0's (0.77 off before)."""
    results = ranks(2, "workers.image_pipelines_d:pipeline_equivalence", kind="dit", config={"ulysses_size": 2},
                    timeout=300)
    assert all(r["diff"] <= PIPELINE_FP32 for r in results), [r["diff"] for r in results]
