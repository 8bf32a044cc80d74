"""Bad input: a clear error on every rank, before any collective that could hang."""
import pytest

from diffpar.testing import RankFailure

pytestmark = pytest.mark.compat  # also runs in CI's diffusers 0.36.0 leg


def _fails_everywhere(ranks, world, expected: list[str], **kwargs):
    with pytest.raises(RankFailure) as err:
        ranks(world, "workers.basics:enable_with", timeout=60, **kwargs)
    text = str(err.value)
    assert f"{world} rank(s) failed" in text, text[-3000:]
    for fragment in expected:
        assert fragment in text, (fragment, text[-3000:])
    return text


def test_ranks_with_different_configs(ranks):
    _fails_everywhere(ranks, 2, ["ranks were given different configurations", "ring_size", "ulysses_size"],
                      config_by_rank=[{"ulysses_size": 2}, {"ring_size": 2}])


def test_different_options_on_one_rank_of_four(ranks):
    _fails_everywhere(ranks, 4, ["rank 3 differs from rank 0", "convert_to_fp32"],
                      config_by_rank=[{"ulysses_size": 2}] * 3 + [{"ulysses_size": 2, "convert_to_fp32": False}])


def test_degree_product_does_not_divide_world(ranks):
    _fails_everywhere(ranks, 4, ["ulysses_size=3", "must divide the world size", "--nproc_per_node=3"],
                      config={"ulysses_size": 3})


def test_degree_product_larger_than_world(ranks):
    _fails_everywhere(ranks, 2, ["does not fit a world of 2"], config={"ulysses_size": 2, "ring_size": 2})


def test_backend_without_context_parallel(ranks):
    _fails_everywhere(ranks, 2, ["'_native_math' does not support context parallelism", "native"],
                      config={"ulysses_size": 2, "attention_backend": "_native_math"})


def test_unknown_backend(ranks):
    _fails_everywhere(ranks, 2, ["'flashy' is not a diffusers attention backend"],
                      config={"ulysses_size": 2, "attention_backend": "flashy"})


def test_model_without_plan_names_supported_ones(ranks):
    _fails_everywhere(ranks, 2, ["UNet2DModel has no context-parallel plan", "FluxTransformer2DModel"],
                      config={"ulysses_size": 2}, model="no-plan")


def test_heads_not_divisible(ranks):
    _fails_everywhere(ranks, 4, ["does not divide the 2 attention heads", "ulysses_size=2", "ulysses_anything=True"],
                      config={"ulysses_size": 4})


def test_extra_module_not_in_pipeline(ranks):
    _fails_everywhere(ranks, 2, ["not a module of this TinyPipeline", "pipe.text_encoder"],
                      config={"ulysses_size": 2}, pipeline=True, foreign_extra=True)


def test_extra_module_unknown_name(ranks):
    _fails_everywhere(ranks, 2, ["has no module named 'text_encoder_9'", "text_encoder"],
                      config={"ulysses_size": 2}, pipeline=True, extra=["text_encoder_9"])


def test_denoiser_listed_as_extra(ranks):
    _fails_everywhere(ranks, 2, ["'transformer' is the denoiser"],
                      config={"ulysses_size": 2}, pipeline=True, extra=["@transformer"])


def test_extra_module_of_unsupported_kind(ranks):
    _fails_everywhere(ranks, 2, ["cannot parallelize a Linear"],
                      config={"ulysses_size": 2}, pipeline=True, extra=["text_encoder"])


def test_anything_needs_installed_support_or_valid_head_padding(ranks):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import unsupported_reason

    config = {"ulysses_size": 4, "ulysses_anything": True}
    expected = unsupported_reason(config) or "ulysses_anything with ulysses_size=4 and 6 attention heads"
    _fails_everywhere(ranks, 4, [expected], config=config, model_kwargs={"heads": 6})


def test_any_local_failure_on_one_rank_reaches_every_rank(ranks):
    with pytest.raises(RankFailure) as err:
        ranks(4, "workers.basics:agree_with_error_on", timeout=60, rank=2)
    text = str(err.value)
    assert "4 rank(s) failed" in text
    assert "rank 2 failed its checks (KeyError)" in text and "only this rank failed" in text
