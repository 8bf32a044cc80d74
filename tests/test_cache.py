"""enable_cache(cache_config=...): caches under context parallelism take one decision on every rank.

The multi-rank cases feed a tiny Flux transformer inputs whose last sequence shard changes much more than the
rest, with a threshold placed so that the shard-local measure of some ranks says "skip" and of others "compute"
(asserted from what each rank measured). With the reduction every rank takes the one-process decision; without
it the ranks part ways inside the attention all-to-alls and hang (asserted too).
"""
import copy

import pytest
import torch
from tolerances import BITWISE, CACHE_FP32

import diffpar
from diffpar import DiffparError
from diffpar.cache import DBCacheConfig, cache_stats, reset_cache
from diffpar.testing import tiny_transformers

# (world, parallelism, cache kind, cache kwargs, model overrides)
LAYOUTS = [
    pytest.param(2, {"ulysses_size": 2}, "dbcache", {"Bn_compute_blocks": 1}, {}, id="w2-ulysses-dbcache"),
    pytest.param(2, {"ulysses_size": 2}, "fbc", {}, {}, id="w2-ulysses-diffusers-fbc"),
    pytest.param(2, {"ulysses_size": 2}, "dbcache",
                 {"Fn_compute_blocks": 2, "Bn_compute_blocks": 1, "max_warmup_steps": 1,
                  "max_continuous_cached_steps": 1}, {}, id="w2-ulysses-dbcache-Fn2-warmup-cap"),
    pytest.param(2, {"ring_size": 2}, "dbcache", {"Bn_compute_blocks": 1}, {}, id="w2-ring-dbcache"),
    pytest.param(4, {"ulysses_size": 4}, "dbcache", {"Bn_compute_blocks": 1}, {"heads": 4}, id="w4-ulysses-dbcache"),
    pytest.param(4, {"ulysses_size": 4}, "fbc", {}, {"heads": 4}, id="w4-ulysses-diffusers-fbc"),
    pytest.param(4, {"ulysses_size": 2}, "dbcache", {"Bn_compute_blocks": 1}, {}, id="w4-ulysses2-two-model-copies"),
    pytest.param(2, {"tp_size": 2}, "dbcache", {"Bn_compute_blocks": 1}, {}, id="w2-tp-dbcache"),
    pytest.param(4, {"ulysses_size": 2, "tp_size": 2}, "fbc", {}, {"heads": 4}, id="w4-ulysses2xtp2-diffusers-fbc"),
]


def _locally_skips(decision, threshold):
    _, _, _, _, local_diff = decision
    return None if local_diff is None else local_diff <= threshold


@pytest.mark.parametrize("world,config,kind,cache_kwargs,model_kwargs", LAYOUTS)
def test_ranks_agree_and_match_one_process(ranks, world, config, kind, cache_kwargs, model_kwargs):
    results = ranks(world, "workers.cache:cache_equivalence", timeout=120, config=config, kind=kind,
                    cache_kwargs=cache_kwargs, model_kwargs=model_kwargs)
    threshold = results[0]["probe"]["threshold"]
    cp_degree = config.get("ulysses_size", 1) * config.get("ring_size", 1)
    model_degree = cp_degree * config.get("tp_size", 1)
    reference = results[0]["reference_pattern"]

    for r in results:
        assert r["group_size"] == model_degree
        # Same skip pattern as the same cache in one process, on every rank.
        assert r["pattern"] == reference, (r["rank"], r["pattern"], reference)
        # The measure itself is the same on every rank (it was reduced).
        mine, first = [d[3] for d in r["decisions"]], [d[3] for d in results[0]["decisions"]]
        assert len(mine) == len(first)
        for a, b in zip(mine, first):  # None: a step with no measure (warmup), identical on every rank
            assert (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= 1e-12 * abs(b))
        assert max(r["diffs"]) <= CACHE_FP32, (r["rank"], r["diffs"])
        # One all-reduce per step that reached the measure, none for warmup / first step / capped steps.
        assert r["collectives"] == sum(d[3] is not None for d in r["decisions"])
        assert r["after_reset_reasons"][0] in ("first step", "warmup"), "a reset must drop the cached residual"
        assert r["after_reset_pattern"] == reference[:3]
        assert r["detach_equal"], "after detach the model must compute exactly what it did before"
        assert r["leftover_hooks"] == []
    assert results[0]["computed"] > 0 and results[0]["skipped"] > 0, reference

    # Under context parallelism the case is a real divergence: within one model copy, some step is one that some
    # ranks' own shard would skip and others' would compute. (Tensor parallelism alone replicates activations.)
    if cp_degree == 1:
        return
    group_ranks = results[:model_degree]
    per_step_local = list(zip(*[[_locally_skips(d, threshold) for d in r["decisions"]] for r in group_ranks]))
    assert any(len(set(step)) > 1 for step in per_step_local if None not in step), per_step_local


def test_cap_and_warmup_shape_the_pattern(ranks):
    results = ranks(2, "workers.cache:cache_equivalence", timeout=120, config={"ulysses_size": 2}, kind="dbcache",
                    cache_kwargs={"Fn_compute_blocks": 2, "Bn_compute_blocks": 1, "max_warmup_steps": 2,
                                  "max_continuous_cached_steps": 1})
    reasons = [d[2] for d in results[0]["decisions"]]
    assert reasons[:2] == ["warmup", "warmup"]
    pattern = results[0]["pattern"]
    assert not any(not a and not b for a, b in zip(pattern, pattern[1:])), f"two skips in a row: {pattern}"


@pytest.mark.parametrize("kind", ["taylorseer", "magcache", "pab", "seacache"])
def test_other_diffusers_caches_under_ulysses(ranks, kind):
    """TaylorSeer, MagCache and PyramidAttentionBroadcast decide from step counters and timesteps only: every rank
    agrees with no reduction. SeaCache's gate is voted (one all-reduce per step)."""
    from diffpar.compat.diffusers_cache import native_cache_configs

    name = {"taylorseer": "TaylorSeerCacheConfig", "magcache": "MagCacheConfig",
            "pab": "PyramidAttentionBroadcastConfig", "seacache": "SeaCacheConfig"}[kind]
    if name not in native_cache_configs():
        pytest.skip(f"this diffusers release has no {name}")
    results = ranks(2, "workers.cache:cache_equivalence", timeout=120, config={"ulysses_size": 2}, kind=kind)
    for r in results:
        assert (r["collectives"] > 0) == (kind == "seacache"), r["collectives"]
        assert r["cache_effect"] > 0, "the cache must have skipped or approximated something"
        assert max(r["diffs"]) <= CACHE_FP32, r["diffs"]
        assert r["detach_equal"] and r["leftover_hooks"] == []


def test_bad_cache_config_fails_on_every_rank(ranks):
    from diffpar.testing import RankFailure

    with pytest.raises(RankFailure) as err:
        ranks(2, "workers.cache:bad_cache_config", config={"ulysses_size": 2},
              cache=DBCacheConfig(Fn_compute_blocks=2))
    text = str(err.value)
    assert "2 rank(s) failed" in text
    assert "leaves no block to skip" in text and "Choose Fn_compute_blocks + Bn_compute_blocks < 2" in text


# ---------------------------------------------------------------------------------------------------------------
# One process: configuration errors, mapping, reset, detach
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"Fn_compute_blocks": 0}, "Fn_compute_blocks must be an integer >= 1"),
    ({"Bn_compute_blocks": -1}, "Bn_compute_blocks must be an integer >= 0"),
    ({"residual_diff_threshold": -0.1}, "residual_diff_threshold must be a number >= 0"),
    ({"residual_diff_threshold": "0.1"}, "residual_diff_threshold must be a number >= 0"),
    ({"max_warmup_steps": 1.5}, "max_warmup_steps must be an integer >= 0"),
    ({"max_continuous_cached_steps": 0}, "max_continuous_cached_steps must be a positive integer, or None / -1"),
])
def test_dbcache_config_rejects(kwargs, message):
    with pytest.raises(DiffparError, match=message):
        DBCacheConfig(**kwargs)


def test_minus_one_means_no_cap():
    cfg = DBCacheConfig(max_continuous_cached_steps=-1, max_cached_steps=-1)
    assert cfg.max_continuous_cached_steps is None and cfg.max_cached_steps is None


def _tiny_flux():
    model, make_inputs = tiny_transformers.build("flux", layers=2, single_layers=2)
    return model, make_inputs(seq=16)


def test_unknown_cache_config_is_refused():
    model, _ = _tiny_flux()
    with pytest.raises(DiffparError,
                       match="cache_config must be one of .*diffpar.DBCacheConfig.*FirstBlockCacheConfig"):
        diffpar.enable_cache(model, cache_config={"residual_diff_threshold": 0.1})
    assert not hasattr(model, "_diffpar_handle")


def test_too_many_compute_blocks_is_refused():
    model, _ = _tiny_flux()
    with pytest.raises(DiffparError, match="Fn_compute_blocks=3 \\+ Bn_compute_blocks=1 leaves no block to skip"):
        diffpar.enable_cache(model, cache_config=DBCacheConfig(Fn_compute_blocks=3, Bn_compute_blocks=1))


def test_a_cache_already_enabled_is_refused():
    from diffusers import FirstBlockCacheConfig

    model, _ = _tiny_flux()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    with pytest.raises(DiffparError, match="already has a diffusers cache enabled.*disable_cache"):
        diffpar.enable_cache(model, cache_config=DBCacheConfig(Bn_compute_blocks=1))


def test_first_block_shape_maps_to_diffusers_fbc():
    model, _ = _tiny_flux()
    handle = diffpar.enable_cache(model, cache_config=DBCacheConfig(residual_diff_threshold=0.1))
    implementation = handle.state("cache").implementation
    assert implementation == {"FluxTransformer2DModel": "diffusers FirstBlockCacheConfig (reduced)"}
    assert type(model._cache_config).__name__ == "FirstBlockCacheConfig" and model._cache_config.threshold == 0.1
    handle.detach()
    assert model._cache_config is None


def test_check_cache_is_local_and_describe_is_rank_comparable():
    """`check_cache` raises before any collective (so enable_cache can run it among its local checks), and
    `describe_cache` gives the same text on every rank, callbacks included."""
    from diffusers import PyramidAttentionBroadcastConfig

    from diffpar.cache import check_cache, describe_cache

    model, _ = _tiny_flux()
    with pytest.raises(DiffparError, match="leaves no block to skip"):
        check_cache(model, DBCacheConfig(Fn_compute_blocks=4))
    assert check_cache(model, DBCacheConfig(Bn_compute_blocks=1)).dbcache_plans
    pab = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: 1)
    assert describe_cache(pab)["current_timestep_callback"] == "<callable>"
    assert describe_cache(DBCacheConfig())["residual_diff_threshold"] == "0.08"


def _loop(model, inputs, n, context=None):
    outs = []
    with torch.no_grad():
        for k in range(n):
            x = dict(inputs, hidden_states=inputs["hidden_states"] * (1 + 0.01 * k))
            if context is None:
                outs.append(model(**x)[0])
            else:
                with model.cache_context(context):
                    outs.append(model(**x)[0])
    return outs


def test_bare_model_loop_reset_and_detach():
    """Without any cache_context (a user's own loop) the hooks use one default context; reset_cache starts over;
    a skipped step reuses exactly the residual of the last computed one; detach restores the model bit for bit."""
    model, inputs = _tiny_flux()
    pristine = copy.deepcopy(model)
    handle = diffpar.enable_cache(model, cache_config=DBCacheConfig(Bn_compute_blocks=1, residual_diff_threshold=0.5))
    outs = _loop(model, inputs, 3)
    stats = cache_stats(model)
    assert stats.pattern() == [True, False, False] and stats.computed == 1 and stats.skipped == 2
    assert {d.context for d in stats.decisions} == {"default"}
    reset_cache(model)
    _loop(model, inputs, 1)
    assert stats.decisions[-1].reason == "first step"
    # Step 0 computed everything: equal to the uncached model.
    with torch.no_grad():
        assert (outs[0] - pristine(**inputs)[0]).abs().max().item() == BITWISE
    handle.detach()
    assert all(not hasattr(m, "_diffusers_hook") and "forward" not in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], pristine(**inputs)[0])


def test_contexts_keep_separate_states():
    """cond / uncond calls (classifier-free guidance) each compare against their own previous step."""
    model, inputs = _tiny_flux()
    diffpar.enable_cache(model, cache_config=DBCacheConfig(Bn_compute_blocks=1, residual_diff_threshold=0.5))
    _loop(model, inputs, 2, context="cond")
    _loop(model, inputs, 2, context="uncond")
    stats = cache_stats(model)
    assert stats.pattern("cond") == [True, False] and stats.pattern("uncond") == [True, False]
    diffpar.disable_cache(model)


def test_threshold_zero_never_skips_and_matches_uncached():
    model, inputs = _tiny_flux()
    pristine = copy.deepcopy(model)
    diffpar.enable_cache(model, cache_config=DBCacheConfig(Bn_compute_blocks=1, residual_diff_threshold=0.0))
    cached = _loop(model, inputs, 3, context="cond")
    plain = _loop(pristine, inputs, 3)
    assert cache_stats(model).skipped == 0
    assert all(torch.equal(a, b) for a, b in zip(cached, plain))


def test_pipeline_resets_between_calls_and_matches_one_process(ranks):
    """A tiny FluxPipeline: its denoising loop enters `cache_context("cond")` and resets stateful hooks at the end
    of each call, so two calls take the same decisions; under Ulysses they are the one-process decisions."""
    results = ranks(2, "workers.cache:pipeline_cache", timeout=180)
    reference = results[0]["reference_patterns"]
    assert reference[0] == reference[1], "the second call must start from an empty cache"
    assert True in reference[0] and False in reference[0], reference
    for r in results:
        assert r["patterns"] == reference, (r["rank"], r["patterns"], reference)
        assert max(r["image_diffs"]) <= CACHE_FP32, r["image_diffs"]


def test_without_the_reduction_ranks_hang(ranks):
    """The same run with each rank deciding from its own shard (what diffusers' caches do): a hang. Last in this
    file because the pool restarts after it."""
    from diffpar.testing import RankFailure

    with pytest.raises(RankFailure):
        ranks(2, "workers.cache:cache_equivalence", timeout=12, config={"ulysses_size": 2}, kind="dbcache",
              cache_kwargs={"Bn_compute_blocks": 1}, unsynced=True)


@pytest.mark.parametrize("model_name", ["qwenimage", "zimage"])
@pytest.mark.parametrize("world,config", [(2, {"ulysses_size": 2}), (4, {"ulysses_size": 4})])
def test_dbcache_where_the_plan_splits_at_the_first_block(ranks, model_name, world, config):
    """QwenImage and Z-Image split their sequence in a hook on block 0, where DBCache also measures its entry."""
    for r in ranks(world, "workers.cache_models:dbcache_first_block_split", timeout=120, model_name=model_name,
                   config=config):
        assert r["pattern"] == r["reference_pattern"], r
        assert True in r["pattern"] and False in r["pattern"], r["pattern"]
        assert r["diff"] <= CACHE_FP32, r["diff"]
