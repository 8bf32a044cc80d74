"""Offloading with diffpar (issue 14): which diffusers offload modes compose with which parallelism.

| offload | context parallel | text-encoder TP / VAE split | transformer TP |
|---|---|---|---|
| `enable_model_cpu_offload()` (accelerate, a hook per model) | works | works | refused (weights placed by accelerate) |
| group offloading (diffusers hooks per block) | works | refused by the VAE split (hooked forwards) | refused |
| `enable_sequential_cpu_offload()` (weights on meta, per leaf) | refused at plan time | refused | refused |

On CPU the offload device is the CPU: the hooks run as on a GPU, the copies are no-ops (tests/workers/offload.py).
Every offload mode needs accelerate (the `test` extra); without it these tests skip.
"""
import pytest
from tolerances import PIPELINE_FP32

from diffpar.testing.probes import assert_split

ALL_PARTS = ("text_encoder", "text_encoder_2", "vae")


def _needs_accelerate(kind):
    # model and sequential offload are accelerate's; diffusers' group offloading imports accelerate's send_to_device
    pytest.importorskip("accelerate", reason="diffusers' offloading needs accelerate")
    if kind.startswith("group") and not _group_offload_runs_on_cpu():
        pytest.skip("this diffusers release's group offloading fails on CPU even in one process (0.36: "
                    "AttributeError in its hooks), so there is nothing for diffpar to run it with")


def _group_offload_runs_on_cpu() -> bool:
    """diffusers' own group offloading, one process, a tiny VAE on CPU: does it run at all?"""
    import torch

    from diffpar.testing import tiny_vaes

    vae, make_latents, _ = tiny_vaes.build("kl")
    cpu = torch.device("cpu")
    try:
        vae.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
        with torch.no_grad():
            vae.decode(make_latents(height=4, width=4))
    except AttributeError:
        return False
    return True


@pytest.mark.parametrize("kind,order,config,extra", [
    pytest.param("model", "before", {"ulysses_size": 2}, ALL_PARTS, id="model-before-ulysses-all-parts"),
    pytest.param("model", "after", {"ulysses_size": 2}, ALL_PARTS, id="model-after-ulysses-all-parts"),
    pytest.param("model", "before", {"ring_size": 2}, ("text_encoder_2",), id="model-before-ring-t5-tp"),
    pytest.param("group", "before", {"ulysses_size": 2}, ("text_encoder", "text_encoder_2"), id="group-ulysses"),
])
def test_offload_with_parallelism_matches_one_process(ranks, kind, order, config, extra):
    _needs_accelerate(kind)
    results = ranks(2, "workers.offload:offload_equivalence", kind=kind, order=order, config=config, extra=extra)
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"])
        assert r["hooks"]["transformer"], ("the offload hooks must be in place during the call", r["hooks"])
        if any(name.startswith("text_encoder") for name in extra):
            assert any("text-encoder" in s or "text_encoder" in s for s in r["steps"]), r["steps"]
    assert_split(results, config)


@pytest.mark.parametrize("kind,config,extra,expected", [
    pytest.param("sequential", {"ulysses_size": 2}, (), "sequential CPU offload", id="sequential-cp"),
    pytest.param("model", {"tp_size": 2}, (), "tp_size=2", id="model-transformer-tp"),
    pytest.param("group_vae", {"ulysses_size": 2}, ("vae",), "offloading hooks", id="group-vae-split"),
])
def test_offload_refused_before_anything_changes(ranks, kind, config, extra, expected):
    _needs_accelerate(kind)
    for r in ranks(2, "workers.offload:offload_refused", kind=kind, config=config, extra=extra):
        assert r["error"] is not None and expected in r["error"], r
        assert r["unchanged"], r
