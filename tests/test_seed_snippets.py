"""The seed's snippets run as written, with `import cache_dit` changed to `import diffpar as cache_dit`."""
import pytest
from tolerances import PIPELINE_FP32

pytestmark = pytest.mark.compat


@pytest.mark.parametrize("which", ["tp-text-encoder", "cp-text-encoder", "cp-text-encoder-vae", "zimage-controlnet"])
def test_seed_snippet(ranks, which):
    import diffusers

    if which == "zimage-controlnet" and not hasattr(diffusers, "ZImageControlNetPipeline"):
        pytest.skip("this diffusers release has no ZImageControlNetPipeline (added in 0.37)")
    for r in ranks(2, "workers.seed_snippets:snippet", which=which, timeout=300):
        assert r["diff"] <= PIPELINE_FP32, r
