"""DreamLitePipeline (text to image) end to end on 2 ranks vs one process: the DreamLite U-Net's attention stages
context parallel (Ulysses), the Qwen3-VL text encoder tensor parallel, the VAE (AutoencoderTiny) decode split by
rows."""
import pytest
from tolerances import PIPELINE_FP32

import diffusers
from availability import diffusers_has

from diffpar.testing.probes import assert_split

pytestmark = pytest.mark.skipif(not diffusers_has("DreamLitePipeline"),
                                reason=f"diffusers {diffusers.__version__} has no DreamLitePipeline")


def test_dreamlite_pipeline_whole_world(ranks):
    config = {"ulysses_size": 2}
    # rank r passes generator seed r: diffpar's broadcasts must make every rank use rank 0's noise.
    results = ranks(2, "workers.dreamlite_pipeline:pipeline_equivalence", config=config, rank_seeds=True, timeout=300)
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["diff"], r["scale"])
        assert r["repeat_diff"] == 0.0, "a second call must give the same image (no state left between calls)"
        assert r["ranks_identical"], "every rank must hold the same image"
        assert any("text_encoder" in s for s in r["steps"]), r["steps"]  # the text encoder was made parallel
        assert r["vae_calls"]["decode"]["split"] >= 1, r["vae_calls"]  # the image was decoded split
    assert_split(results, config)  # every denoising step's U-Net attention ran on a token shard
