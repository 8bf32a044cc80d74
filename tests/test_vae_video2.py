"""Split VAE decode / encode for the VAE classes added in issue 13 item 3 (one family file each under
diffpar/families/vaes/), vs the same VAE in one process: 2, 3 and 4 ranks, odd latent heights, odd frame counts."""
from availability import needs
import pytest
from test_vae import _check_equivalence
from tolerances import VAE_FP32, VAE_FP32_DEEP_VIDEO, VAE_FP64


FAMILIES = [
    pytest.param("hunyuan_image_refiner", marks=needs("AutoencoderKLHunyuanImageRefiner")),
    pytest.param("magvit", marks=needs("AutoencoderKLMagvit")),
    pytest.param("allegro", marks=needs("AutoencoderKLAllegro")),
    pytest.param("kvae", marks=needs("AutoencoderKLKVAE")),
    pytest.param("kvae_video", marks=needs("AutoencoderKLKVAEVideo")),
    pytest.param("minimax_h3", marks=needs("AutoencoderKLMiniMaxH3")),
]

# diffusers decodes Allegro only in tiles, one sample at a time (its tile buffer has batch 1); the tiny builder's
# tiles are 11 latent rows every 2 rows and 3 frames, so inputs are 13 x 10 latents, 3 frames (two tiles, each split).
# KVAE video runs its clip in 16-frame segments that hand the conv caches on: 7 latent frames (25 image frames)
# make two segments.
SHAPES = {"allegro": {"batch": 1, "frames": 3, "fp64": (13, 10, 3), "split_rows": 44,
                      "fp32_tolerance": VAE_FP32_DEEP_VIDEO},
          "kvae_video": {"frames": 7, "fp64": (11, 9, 7), "fp32_tolerance": VAE_FP32_DEEP_VIDEO}}


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_matches_whole_fp32(ranks, family, world):
    """13 latent rows (uneven bands on 2, 3 and 4 ranks), batch 2, 3 latent frames; encode too."""
    shape = SHAPES.get(family, {})
    results = ranks(world, "workers.vae:equivalence", family=family, height=13, width=10,
                    batch=shape.get("batch", 2), frames=shape.get("frames", 3))
    _check_equivalence(results, shape.get("fp32_tolerance", VAE_FP32), world)
    sizes = results[0]["sizes"]  # the bands of the last split call: the encode's, in image rows
    # One band of rows per rank, uneven, covering the image (Allegro's: each 44-row tile) exactly.
    assert len(sizes) == world and len(set(sizes)) > 1 and min(sizes) >= 2, sizes
    assert sum(sizes) == SHAPES.get(family, {}).get("split_rows", results[0]["want_shape"][-2]), sizes
    assert all(r["sizes"] == sizes for r in results)


@pytest.mark.parametrize("family", FAMILIES)
def test_split_is_exact_in_fp64(ranks, family):
    """In fp64 rounding vanishes: what remains would be a logic error (a wrong halo, a local statistic)."""
    height, width, frames = SHAPES.get(family, {}).get("fp64", (11, 9, 5))
    results = ranks(3, "workers.vae:equivalence", family=family, height=height, width=width, batch=1, frames=frames,
                    dtype="float64")
    _check_equivalence(results, VAE_FP64, 3)


@needs("AutoencoderKLMiniMaxH3")
def test_minimax_decoder_with_another_attention_backend_is_refused():
    """The ViT decoder's split computes attention itself: a backend chosen for it would be silently bypassed."""
    import diffpar.families.catalog  # noqa: F401
    from diffpar.errors import UnsupportedError
    from diffpar.families.vaes.base import VaeAdapter
    from diffpar.testing import tiny_vaes

    vae, _, _ = tiny_vaes.build("minimax_h3")
    split = VaeAdapter().plan(vae, "vae", 2, None).payload
    assert ("decoder", "") in {(part, name) for part, name, _ in split.wraps}  # the whole ViT decoder, one wrapper
    assert split.attention_gathers == 1
    vae.decoder.transformer_blocks[1].attn.processor._attention_backend = "flash"
    with pytest.raises(UnsupportedError, match="an attention backend or diffusers' own context parallelism"):
        VaeAdapter().plan(vae, "vae", 2, None)
