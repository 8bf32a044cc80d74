"""`diffpar.plan(...)`: a typed, immutable dry run, computed with no collective and no change to any module."""
import dataclasses
import json

import pytest
import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_pipelines, tiny_transformers

pytestmark = pytest.mark.compat


def _pipe():
    pipe = tiny_pipelines.build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _snapshot(pipe):
    weights = {f"{n}.{k}": v.clone() for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)
               for k, v in c.state_dict().items()}
    hooks = sorted(
        (n, path, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in vars(m))
        for n, c in pipe.components.items() if isinstance(c, torch.nn.Module) for path, m in c.named_modules()
    )
    return weights, hooks, sorted(vars(pipe))


def _config(pipe, **degrees):
    return diffpar.ParallelismConfig(
        **degrees, parallel_kwargs={"extra_parallel_modules": [pipe.text_encoder, pipe.text_encoder_2, pipe.vae]}
    )


def test_plan_is_a_dry_run_of_the_whole_pipeline():
    pipe = _pipe()
    weights, hooks, attrs = _snapshot(pipe)
    plan = diffpar.plan(pipe, cache_config=diffpar.DBCacheConfig(), world_size=4,
                        parallelism_config=_config(pipe, ulysses_size=2, tp_size=2))
    assert isinstance(plan, diffpar.ParallelPlan)
    assert not dist.is_initialized(), "planning must not start torch.distributed"
    after_weights, after_hooks, after_attrs = _snapshot(pipe)
    assert after_hooks == hooks and after_attrs == attrs
    assert weights.keys() == after_weights.keys() and all(torch.equal(weights[k], after_weights[k]) for k in weights)

    assert (plan.layout.dp, plan.layout.ring, plan.layout.ulysses, plan.layout.tp) == (1, 1, 2, 2)
    roles = {c.name: c.role for c in plan.components}
    assert roles == {"transformer": "denoiser", "text_encoder": "text encoder", "text_encoder_2": "text encoder",
                     "vae": "vae", "cache": "cache"}
    transformer = plan.component("transformer")
    assert transformer.engine == "context parallel + tensor parallel"
    assert transformer.group == "ulysses x tp"
    assert 0 < transformer.weight_bytes_per_rank < 0.75 * transformer.weight_bytes  # TP split the weights
    t5 = plan.component("text_encoder_2")
    assert t5.weight_bytes_per_rank < t5.weight_bytes
    assert plan.component("vae").weight_bytes_per_rank == plan.component("vae").weight_bytes  # rows, not weights

    text = str(plan)
    for fragment in ("world 4 = dp 1 x ring 1 x ulysses 2 x tp 2",
                     "transformer (FluxTransformer2DModel): context parallel + tensor parallel over ulysses x tp",
                     "weights per rank:", "stays whole:", "text_encoder_2 (T5EncoderModel): tensor parallel",
                     "vae (AutoencoderKL): vae row split", "cache (DBCacheConfig): cache sync over model copy (4 ranks)"):
        assert fragment in text, (fragment, text)

    # A world larger than the model degrees: the plan says which work is redundant.
    wide = diffpar.plan(pipe, world_size=8, parallelism_config=diffpar.ParallelismConfig(
        ulysses_size=2, tp_size=2, parallel_kwargs={"extra_parallel_modules": [pipe.vae]}))
    assert (wide.layout.dp, wide.layout.world_size) == (2, 8)
    assert "each of the 2 dp groups computes the denoiser redundantly" in str(wide)


def test_plan_is_immutable_and_its_description_is_plain_data():
    pipe = _pipe()
    plan = diffpar.plan(pipe, parallelism_config=_config(pipe, ulysses_size=2), world_size=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layout = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.components[0].engine = "nothing"
    described = plan.describe()
    assert json.loads(json.dumps(described)) == described  # what ranks exchange: JSON, no objects
    other = _pipe()
    again = diffpar.plan(other, parallelism_config=_config(other, ulysses_size=2), world_size=2).describe()
    assert again["denoiser:transformer"] == described["denoiser:transformer"]
    assert set(described) >= {"config", "versions", "layout", "denoiser:transformer", "text encoder:text_encoder",
                              "vae:vae"}


def test_plan_raises_what_the_launch_would_raise():
    model, _ = tiny_transformers.build("flux")  # 2 attention heads
    with pytest.raises(diffpar.UnsupportedError, match="does not divide the 2 attention heads"):
        diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=4), world_size=4)
    with pytest.raises(diffpar.DiffparError, match="must divide the world size"):
        diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=3), world_size=4)


def test_one_process_plan_says_nothing_is_split():
    model, _ = tiny_transformers.build("flux")
    plan = diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=2))
    assert plan.layout is None and plan.components == ()
    assert "one process (nothing to split)" in str(plan)


def test_enable_cache_applies_the_plan_it_agreed_on(ranks):
    results = ranks(2, "workers.planning:applied_plan", timeout=120)
    for r in results:
        assert r["handle_plan"] == r["dry_run"], "enable_cache must apply what diffpar.plan describes"
        assert r["parallelize_same_path"]
        assert r["tokens_in_attention"] < r["tokens_whole"], r  # the plan was carried out: the sequence split


def test_one_process_enable_cache_checks_the_config_like_a_launch():
    """Plain `python app.py`: the same refusal the multi-rank launch would give, before any GPU is spent."""
    model, _ = tiny_transformers.build("flux")  # 2 attention heads
    with pytest.warns(UserWarning, match="one process only"):
        with pytest.raises(diffpar.UnsupportedError, match="does not divide the 2 attention heads"):
            diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=4))
    assert getattr(model, "_diffpar_handle", None) is None


def test_training_mode_with_dropout_is_refused_by_name():
    pipe = _pipe()
    pipe.text_encoder_2.train()
    pipe.text_encoder_2.encoder.dropout.p = 0.1  # as T5 ships (dropout_rate 0.1); the tiny config has 0
    with pytest.raises(diffpar.DiffparError, match=r"text_encoder_2 \(T5EncoderModel\) is in training mode with "
                                                   r"dropout at encoder.dropout \(p=0.1\).*text_encoder_2\.eval\(\)"):
        diffpar.plan(pipe, parallelism_config=_config(pipe, ulysses_size=2), world_size=2)
    pipe.text_encoder_2.eval()
    model, _ = tiny_transformers.build("flux")
    model.train()  # diffusers' transformers have dropout 0: training mode alone changes nothing, so it is allowed
    diffpar.plan(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=2), world_size=2)


def test_attention_backend_without_its_package_is_refused_before_the_agreement(ranks):
    """flash / sage without their package: every rank refuses at planning (issue 10 item 4), naming the package,
    instead of one rank failing alone while applying."""
    from diffpar.compat.diffusers_cp import backend_unavailable_reason

    if backend_unavailable_reason("flash") is None:
        pytest.skip("flash-attn is installed here")
    messages = ranks(2, "workers.transformer_tp:expect_error", model_name="flux", model_kwargs={"heads": 4},
                     config={"ulysses_size": 2, "attention_backend": "flash"})
    assert all(m and "cannot run in this process" in m and "flash-attn" in m for m in messages), messages
