"""Whole pipelines from tiny random components: `enable_cache(pipe, ...)` on 2 and 4 ranks vs one process."""
import pytest
from tolerances import PIPELINE_FP32

from diffpar.testing.probes import assert_split

pytestmark = pytest.mark.compat  # also runs in CI's diffusers 0.36.0 leg

CASES = [
    pytest.param("flux", 2, {"ulysses_size": 2}, [], id="flux-w2-ulysses"),
    pytest.param("flux", 2, {"ring_size": 2}, [], id="flux-w2-ring"),
    pytest.param("flux", 4, {"ulysses_size": 2, "ring_size": 2}, [], id="flux-w4-ulysses2xring2"),
    pytest.param("wan", 2, {"ulysses_size": 2}, [], id="wan-w2-ulysses"),
    pytest.param("wan", 4, {"ulysses_size": 4}, [], id="wan-w4-ulysses"),
]


@pytest.mark.parametrize("kind,world,config,extra", CASES)
def test_pipeline_matches_one_process(ranks, expect_cp, kind, world, config, extra):
    results = expect_cp(ranks, world, config, "workers.pipelines:pipeline_equivalence", kind=kind, extra=extra,
                        timeout=300)
    if results is None:
        return
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, r["diff"]
        assert r["repeat_diff"] == 0.0, "a second call must give the same image (no state left between calls)"
        assert r["ranks_identical"], "every rank must hold the same image"
        assert r["detach_diff"] == 0.0 and not r["detach_problems"]
    assert_split(results, config)  # every denoising step's transformer forward ran on a shard


@pytest.mark.parametrize("world", [2, 4])
def test_flux_pipeline_whole_world(ranks, world):
    """Transformer CP + both text encoders TP + VAE split decode, as in the README."""
    results = ranks(world, "workers.pipelines:pipeline_equivalence", kind="flux", config={"ulysses_size": 2},
                    extra=["text_encoder", "text_encoder_2", "vae"], timeout=300)
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, r["diff"]
        assert r["ranks_identical"]
        # Sharded encoders cannot be restored: detach says so instead of pretending.
        assert any("text_encoder" in p for p in r["detach_problems"])
    assert_split(results, {"ulysses_size": 2})


def test_wan_pipeline_whole_world(ranks):
    results = ranks(2, "workers.pipelines:pipeline_equivalence", kind="wan", config={"ulysses_size": 2},
                    extra=["text_encoder", "vae"], timeout=300)
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, r["diff"]
        assert r["ranks_identical"]
    assert_split(results, {"ulysses_size": 2})


@pytest.mark.parametrize("world,config", [
    pytest.param(2, {"ulysses_size": 2}, id="w2-ulysses"),
    pytest.param(3, {"ring_size": 3}, id="w3-ring"),
])
def test_flux_pipeline_odd_prompt_and_image_by_default(ranks, world, config):
    """15 text tokens (max_sequence_length) and a 44 px image (11 x 11 image tokens): no degree divides them, and no
    *_anything flag is set. Where the release splits unevenly the pipeline runs; elsewhere every rank refuses,
    naming the tokens and where they come from."""
    from diffpar.compat import diffusers_cp
    from diffpar.testing import RankFailure

    call_kwargs = {"max_sequence_length": 15, "height": 44, "width": 44}
    if diffusers_cp.uneven_split_option(config.get("ulysses_size", 1), config.get("ring_size", 1)) is None:
        with pytest.raises(RankFailure) as err:
            ranks(world, "workers.pipelines:pipeline_equivalence", kind="flux", config=config,
                  call_kwargs=call_kwargs, timeout=300)
        assert f"{world} rank(s) failed" in str(err.value) and "image tokens" in str(err.value)
        return
    results = ranks(world, "workers.pipelines:pipeline_equivalence", kind="flux", config=config,
                    call_kwargs=call_kwargs, timeout=300)
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, r["diff"]
        assert r["repeat_diff"] == 0.0 and r["ranks_identical"]
        assert r["detach_diff"] == 0.0 and not r["detach_problems"]
    assert_split(results, config)
    from diffpar.testing.probes import expected_shards

    reference = results[0]["split_reference"]
    for stream in ("image_tokens", "text_tokens"):  # each rank's share, as diffusers cut it
        assert sorted(r["split"][stream][0] for r in results) == sorted(expected_shards(reference[stream][0], world))
    assert reference["text_tokens"][0] == 15 and reference["image_tokens"][0] % world  # really indivisible
