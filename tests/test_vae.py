"""Split VAE decode / encode (issue 4) vs the same VAE in one process: every family, 2 and 4 ranks."""
import diffusers
import pytest
from availability import needs
from tolerances import (BITWISE, PIPELINE_FP32, VAE_BF16_MARGIN, VAE_FP32, VAE_FP64, VAE_FP64_LTX,
                        VAE_LINEAR_ATTENTION)

FAMILIES = ["kl", "flux2", "wan", "wan22", "qwen", "hunyuan", "ltx",
            pytest.param("hunyuan_image", marks=needs("AutoencoderKLHunyuanImage")),
            pytest.param("hunyuan_video15", marks=needs("AutoencoderKLHunyuanVideo15")),
            "cogvideox", "mochi", "temporal_decoder",
            pytest.param("ltx2", marks=needs("AutoencoderKLLTX2Video")), "dc",
            pytest.param("cosmos", marks=needs("AutoencoderKLCosmos")),
            # Qwen-Image 2's VAE: added as one table entry (families/vaes/qwenimage21.py); newer diffusers only.
            pytest.param("qwen21", marks=pytest.mark.skipif(not hasattr(diffusers, "AutoencoderKLQwenImage21"),
                                                            reason="this diffusers has no AutoencoderKLQwenImage21"))]


# diffusers' own whole decode fails for these with batch > 1 (HunyuanVideo 1.5's mid-block mask, (B, L, L), is
# broadcast against (B, heads, L, L)): the reference cannot be computed, so they run one sample.
ONE_SAMPLE_ONLY = {"hunyuan_video15": 1}
# Latent heights for 4 ranks when a family's bands need more rows than the defaults give (13 and 11): Sana's DC-AE
# runs 5x5 depthwise convs at latent resolution, so each band needs 5 latent rows. Still odd (uneven bands).
TALLER = {"dc": (21, 23)}


def _check_equivalence(results, tol, world, encode=True, all_split=True):
    for r in results:
        assert r["decode_shape"] == r["want_shape"]
        assert r["decode_diff"] <= tol, (r["rank"], r["decode_diff"])
        assert r["calls"]["decode"]["split"] >= 1, r["calls"]
        assert r["calls"]["decode"]["whole"] == 0 or not all_split, r["calls"]
        if encode:
            assert r["encode_diff"] <= tol, (r["rank"], r["encode_diff"])
            assert r["calls"]["encode"]["split"] >= 1, r["calls"]
        assert r["detach_decode_diff"] == BITWISE, "detach must restore the VAE bit for bit"
        if encode:
            assert r["detach_encode_diff"] == BITWISE
        assert r["patched_left"] == [], r["patched_left"]
        assert r["stats"]["halo_bytes"] > 0
    assert len(results) == world


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_split_matches_whole_fp32(ranks, family, world):
    """13 latent rows (not divisible by 2 or 4), batch 2, 3 latent frames for video VAEs; encode too."""
    results = ranks(world, "workers.vae:equivalence", family=family, height=TALLER.get(family, (13,))[0], width=10,
                    batch=ONE_SAMPLE_ONLY.get(family, 2), frames=3)
    _check_equivalence(results, VAE_LINEAR_ATTENTION if family == "dc" else VAE_FP32, world)
    sizes = results[0]["sizes"]
    assert len(sizes) == world and len(set(sizes)) > 1, sizes  # uneven bands were exercised


@pytest.mark.parametrize("family", FAMILIES)
def test_split_is_exact_in_fp64(ranks, family):
    """In fp64 rounding vanishes: what remains would be a logic error (a wrong halo, a local statistic)."""
    results = ranks(4, "workers.vae:equivalence", family=family, height=TALLER.get(family, (0, 11))[1], width=9,
                    batch=1, frames=2,
                    dtype="float64")
    tolerance = {"ltx": VAE_FP64_LTX, "dc": VAE_LINEAR_ATTENTION}.get(family, VAE_FP64)
    _check_equivalence(results, tolerance, 4)


def test_encode_height_not_a_multiple_of_the_downsampling(ranks):
    """54 image rows for a 4x encoder: bands are whole 4-row units, the last band takes the 2 extra rows."""
    results = ranks(2, "workers.vae:equivalence", family="kl", height=13, image_extra_rows=2)
    _check_equivalence(results, VAE_FP32, 2)


@pytest.mark.parametrize("family", ["kl", "wan", "hunyuan"])
def test_bf16_no_worse_than_one_process(ranks, family):
    results = ranks(2, "workers.vae:bf16_accuracy", family=family)
    for r in results:
        assert r["split_err"] <= r["one_process_err"] * VAE_BF16_MARGIN, r
        assert r["split_encode_err"] <= r["one_process_encode_err"] * VAE_BF16_MARGIN, r


@pytest.mark.parametrize("family,tiling", [
    pytest.param("kl", {}, id="kl"),
    pytest.param("wan", {"tile_sample_min_height": 32, "tile_sample_min_width": 32,
                         "tile_sample_stride_height": 24, "tile_sample_stride_width": 24}, id="wan"),
])
def test_tiling_each_tile_split(ranks, family, tiling):
    """With enable_tiling() the result is diffusers' tiled decode (tiling wins), each tile split over the ranks."""
    if family == "kl":
        # AutoencoderKL tiles by config.sample_size: 32 px tiles = 8 latent rows, overlapping.
        results = ranks(2, "workers.vae:equivalence", family=family, height=20, width=10, batch=1, encode=True,
                        tiling=tiling, min_rows=0)
    else:
        results = ranks(2, "workers.vae:equivalence", family=family, height=18, width=10, batch=1, frames=2,
                        encode=False, tiling=tiling)
    # Edge tiles thinner than 2 latent rows per rank decode whole on every rank (still collectively agreed).
    _check_equivalence(results, VAE_FP32, 2, encode=family == "kl", all_split=False)
    assert results[0]["calls"]["decode"]["split"] > 1  # several tiles, each split


def test_slicing_each_sample_split(ranks):
    results = ranks(2, "workers.vae:equivalence", family="kl", batch=3, slicing=True)
    _check_equivalence(results, VAE_FP32, 2)
    assert results[0]["calls"]["decode"]["split"] == 3


def test_size_rule_default_and_threshold(ranks):
    """Default: split only when every rank gets >= 16 latent rows; a threshold moves that; exact either way."""
    default = ranks(2, "workers.vae:size_rule", family="kl", heights=[6, 31, 32], min_rows=None)
    threshold = ranks(2, "workers.vae:size_rule", family="kl", heights=[3, 4, 9, 10], min_rows=10)
    for per_rank in default:
        assert [d["split"] for d in per_rank] == [False, False, True]
        assert all(d["diff"] <= VAE_FP32 for d in per_rank)
        assert per_rank[0]["diff"] == BITWISE  # not split: exactly the one-process decode
    for per_rank in threshold:
        # 3 rows cannot give 2 ranks 2 rows each: never split, whatever the threshold.
        assert [d["split"] for d in per_rank] == [False, False, False, True]
        assert all(d["diff"] <= VAE_FP32 for d in per_rank)


def test_ranks_decoding_different_shapes_raise_everywhere(ranks):
    results = ranks(2, "workers.vae:mismatched_shapes", timeout=60)
    for r in results:
        assert r["error"] == "RankMismatchError"
        assert "ranks were given different inputs" in r["message"]
        assert "rank 0: decode (1, 4, 14, 10)" in r["message"] and "rank 1: decode (1, 4, 12, 10)" in r["message"]


def test_rank_that_skips_decode_does_not_hang(ranks):
    from diffpar.testing import RankFailure

    with pytest.raises(RankFailure) as info:
        ranks(2, "workers.vae:skipping_rank", timeout=60, timeout_s=2.0)
    message = str(info.value)
    assert "the other ranks did not start the same decode within 2 s" in message
    assert "every rank must call vae.decode()" in message


@pytest.mark.parametrize("case,expected", [
    ("unknown-layer", "no row-split rule for: ['decoder.conv_out.0 (ReflectionPad2d)']"),
    ("fused-attention", "attention processor FusedAttnProcessor2_0"),
    ("group-offload", "offloading hooks on"),
    ("bilinear-upsample", "'bilinear' upsampling by 2"),
    ("shared", "already split by diffpar, through another pipeline that shares it"),
])
def test_refuses_what_it_cannot_split(ranks, case, expected):
    results = ranks(2, "workers.vae:refused", case=case)
    if results[0]["error"] == "setup-unavailable":
        pytest.skip(f"this diffusers release cannot set up {case} on CPU: {results[0]['message']}")
    for r in results:
        assert r["error"] == ("DiffparError" if case == "shared" else "UnsupportedError"), r
        assert expected in r["message"], r["message"]
        assert "extra_parallel_modules" in r["message"]


@pytest.mark.parametrize("world,config", [
    pytest.param(2, {"ulysses_size": 2}, id="w2-ulysses"),
    pytest.param(4, {"ulysses_size": 2, "ring_size": 2}, id="w4-ulysses2xring2"),
])
def test_pipeline_transformer_and_vae_parallel(ranks, expect_cp, world, config):
    results = expect_cp(ranks, world, config, "workers.vae:pipeline_flux", timeout=300)
    if results is None:
        return  # the installed diffusers cannot run this layout; every rank said so clearly
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, r
        assert r["calls"]["decode"]["split"] == 1, r["calls"]
        assert len(r["sizes"]) == world


def test_plan_lists_every_wrapped_layer():
    """The plan names each layer apply will wrap, with its record: apply carries out exactly that list."""
    import diffpar.families.catalog  # noqa: F401
    from diffpar.families.vaes.base import VaeAdapter
    from diffpar.families.vaes.rules import CONV, GROUP_NORM
    from diffpar.testing import tiny_vaes

    vae, _, _ = tiny_vaes.build("kl")
    split = VaeAdapter().plan(vae, "vae", 2, None).payload
    wrapped = {(part, name): rule for part, name, rule in split.wraps}
    assert wrapped[("decoder", "conv_in")] is CONV and wrapped[("decoder", "mid_block.resnets.0.norm1")] is GROUP_NORM
    assert ("decoder", "conv_act") not in wrapped  # row-local: left as it is
    assert (split.min_band_rows, split.down_factor) == (2, 4)
    assert split.halo_layers == 34 and split.whole_image_norms == 30 and split.attention_gathers == 2


def test_band_heights():
    from diffpar.engines.halo import row_sizes

    assert row_sizes(90, 4) == [23, 23, 22, 22]  # a 90-row latent on 4 ranks
    assert row_sizes(13, 2) == [7, 6]
    assert row_sizes(54, 2, unit=4) == [28, 26]  # encode: whole 4-row units, the remainder to the last band
    assert row_sizes(720, 4, unit=8) == [184, 184, 176, 176]
