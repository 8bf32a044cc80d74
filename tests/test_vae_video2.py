"""Split VAE decode / encode for the VAE classes added in issue 13 item 3 (one family file each under
diffpar/families/vaes/), vs the same VAE in one process: 2, 3 and 4 ranks, odd latent heights, odd frame counts."""
import diffusers
import pytest
from test_vae import _check_equivalence
from tolerances import VAE_FP32, VAE_FP64


def _needs(name):
    return pytest.mark.skipif(not hasattr(diffusers, name), reason=f"this diffusers has no {name}")


FAMILIES = [
    pytest.param("hunyuan_image_refiner", marks=_needs("AutoencoderKLHunyuanImageRefiner")),
    pytest.param("magvit", marks=_needs("AutoencoderKLMagvit")),
]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_matches_whole_fp32(ranks, family, world):
    """13 latent rows (uneven bands on 2, 3 and 4 ranks), batch 2, 3 latent frames; encode too."""
    results = ranks(world, "workers.vae:equivalence", family=family, height=13, width=10, batch=2, frames=3)
    _check_equivalence(results, VAE_FP32, world)
    sizes = results[0]["sizes"]
    assert len(sizes) == world and len(set(sizes)) > 1, sizes  # uneven bands: the split was real


@pytest.mark.parametrize("family", FAMILIES)
def test_split_is_exact_in_fp64(ranks, family):
    """In fp64 rounding vanishes: what remains would be a logic error (a wrong halo, a local statistic)."""
    results = ranks(3, "workers.vae:equivalence", family=family, height=11, width=9, batch=1, frames=5,
                    dtype="float64")
    _check_equivalence(results, VAE_FP64, 3)
