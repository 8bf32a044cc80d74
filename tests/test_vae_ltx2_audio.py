"""Split decode / encode of LTX-2's audio VAE (AutoencoderKLLTX2Audio) along TIME (its rows: a mel spectrogram is
(B, C, time, mel bins)) vs the same VAE in one process: 2, 3 and 4 ranks, odd time lengths.

"ltx2_audio" is the released layout: convs causal in time (each band's halo comes from the rank above only), the
decoder's crop to 4 * frames - 3 time steps a no-op. "ltx2_audio_width_attention" covers the rules' other branches:
causal along mel bins (time padded on both sides, the decoder crops the clip's last 3 time steps) and attention over
the whole spectrogram in both mid blocks."""
import pytest
from availability import diffusers_has
from tolerances import BITWISE, VAE_FP32, VAE_FP64

pytestmark = pytest.mark.skipif(not diffusers_has("AutoencoderKLLTX2Audio"),
                                reason="this diffusers has no AutoencoderKLLTX2Audio")

FAMILIES = ["ltx2_audio", "ltx2_audio_width_attention"]
# 13 latent time steps (decoded: 4 * 13 - 3 = 49 spectrogram rows), 4 latent mel bins (16 decoded); the encoded
# spectrogram has 53 time steps (odd, not a multiple of the encoder's stride 4: the last band takes the rest).
LATENT_TIME, LATENT_BINS, EXTRA_IMAGE_ROWS = 13, 4, 1
CAUSAL_IN_TIME = {"ltx2_audio", "ltx2_audio_two_levels"}


def _check_equivalence(results, tol, world, family, encode=True):
    """test_vae's checks; for the causal-in-time VAE, the halo proven one-sided: each band reads only the rank above,
    so every rank but the last sends rows down and the last sends none."""
    assert len(results) == world
    for r in results:
        assert r["decode_shape"] == r["want_shape"]
        assert r["decode_diff"] <= tol, (r["rank"], r["decode_diff"])
        assert r["calls"]["decode"] == {"split": 1, "whole": 0}, r["calls"]
        assert r["detach_decode_diff"] == BITWISE
        if encode:
            assert r["encode_diff"] <= tol, (r["rank"], r["encode_diff"])
            assert r["calls"]["encode"] == {"split": 1, "whole": 0}, r["calls"]
            assert r["detach_encode_diff"] == BITWISE
        assert r["patched_left"] == [], r["patched_left"]
        sent = r["stats"]["halo_bytes"]
        one_sided = family in CAUSAL_IN_TIME and r["rank"] == world - 1
        assert (sent == 0) if one_sided else (sent > 0), (r["rank"], sent)
        # One output gather per split call, plus one key/value gather per call for the mid-block attention.
        calls = 2 if encode else 1
        per_call = 2 if family == "ltx2_audio_width_attention" else 1
        assert r["stats"]["gather_calls"] == calls * per_call, r["stats"]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_matches_whole_fp32(ranks, family, world):
    results = ranks(world, "workers.vae:equivalence", family=family, height=LATENT_TIME, width=LATENT_BINS,
                    batch=2, image_extra_rows=EXTRA_IMAGE_ROWS)
    _check_equivalence(results, VAE_FP32, world, family)
    assert results[0]["want_shape"][-2:] == (4 * LATENT_TIME - 3, 4 * LATENT_BINS)
    # The last split call is the encode: one band of time steps per rank, multiples of 4 but the last, uneven,
    # covering the 53-step spectrogram exactly; every rank saw the same bands.
    sizes = results[0]["sizes"]
    assert len(sizes) == world and min(sizes) >= 4 and sum(sizes) == 4 * LATENT_TIME + EXTRA_IMAGE_ROWS, sizes
    assert all(s % 4 == 0 for s in sizes[:-1]) and len(set(sizes)) > 1, sizes
    assert all(r["sizes"] == sizes for r in results)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_bands_are_latent_time_steps(ranks, family):
    """Decode only: the bands are the 13 latent time steps, uneven over 3 ranks."""
    results = ranks(3, "workers.vae:equivalence", family=family, height=LATENT_TIME, width=LATENT_BINS, batch=1,
                    encode=False)
    _check_equivalence(results, VAE_FP32, 3, family, encode=False)
    sizes = results[0]["sizes"]
    assert len(sizes) == 3 and sum(sizes) == LATENT_TIME and min(sizes) >= 2 and len(set(sizes)) > 1, sizes


@pytest.mark.parametrize("family", [*FAMILIES, "ltx2_audio_two_levels"])
def test_split_is_exact_in_fp64(ranks, family):
    """In fp64 rounding vanishes: what remains would be a logic error (a one-sided halo on the wrong side, the
    first row dropped on the wrong band, a crop or a zero-pad in band coordinates)."""
    results = ranks(3, "workers.vae:equivalence", family=family, height=11, width=LATENT_BINS, batch=1,
                    image_extra_rows=3, dtype="float64")
    _check_equivalence(results, VAE_FP64, 3, family)


def test_plan():
    """What the split wraps: the decoder itself (its crop in clip coordinates), an encoder stride of 4 in time."""
    import diffpar.families.catalog  # noqa: F401
    from diffpar.families.vaes.base import VaeAdapter
    from diffpar.testing import tiny_vaes

    vae, _, _ = tiny_vaes.build("ltx2_audio")
    split = VaeAdapter().plan(vae, "vae", 3, None).payload
    assert split.down_factor == 4 and split.attention_gathers == 0 and split.halo_layers > 0
    assert ("decoder", "") in {(part, name) for part, name, _ in split.wraps}
    vae, _, _ = tiny_vaes.build("ltx2_audio_width_attention")
    assert VaeAdapter().plan(vae, "vae", 3, None).payload.attention_gathers == 2


def test_released_configuration_is_planned():
    """The released layout (diffusers' defaults: 128 channels, 2 blocks per level, 8 latent channels, 64 mel bins)
    has a rule for every layer; built on the meta device, so nothing is allocated."""
    import torch
    from diffusers import AutoencoderKLLTX2Audio

    import diffpar.families.catalog  # noqa: F401
    from diffpar.families.vaes.base import VaeAdapter

    with torch.device("meta"):
        vae = AutoencoderKLLTX2Audio()
    split = VaeAdapter().plan(vae, "vae", 8, None).payload
    assert split.down_factor == 4 and split.attention_gathers == 0 and split.min_band_rows == 2
