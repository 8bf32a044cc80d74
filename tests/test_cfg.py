"""CFG and batch parallelism (issue 11): the guidance branches, or the batch, split over the outermost rank groups.

Every case compares the image with the same pipeline in one process and proves the split from the forwards each
rank's denoiser really ran (a pre-hook inside every wrapper): a no-op parallel setup computes every call on every
rank and fails these counts.
"""
import pytest
from tolerances import PIPELINE_FP32

import diffpar
from diffpar.testing import RankFailure

STEPS = 2


def _check_image(results, exact=False):
    for r in results:
        assert r["finite"], "a NaN placeholder reached the image"
        assert r["diff"] <= (0.0 if exact else PIPELINE_FP32), r["diff"]
        assert r["repeat_diff"] == 0.0, "a second call must give the same image"
        assert r["ranks_identical"]
        assert r["detached"] and r["detach_diff"] == 0.0


def _check_two_calls(results, batch=1):
    """First call: group 0 computed the cond call of every step, group 1 the uncond call of every step plus the
    first step's cond (it learns the output template there): half the calls of one process each, plus one."""
    for r in results:
        assert r["reference_batches"] == [batch] * (2 * STEPS)
        expected = STEPS if r["group"] == 0 else STEPS + 1
        assert r["batches"] == [batch] * expected, (r["rank"], r["batches"])
        assert r["exchanges"] == STEPS and r["mode"] == "two_calls"
        assert r["placeholders"] == (0 if r["group"] == 0 else STEPS - 1)
        # The second call has inputs of the same shapes and says guidance is on: it splits from its first step,
        # every group computing exactly half the calls.
        assert r["split_from_first_step"] == 1, r
        assert r["again_batches"] == [batch] * STEPS, (r["rank"], r["again_batches"])
        assert r["again_placeholders"] == (0 if r["group"] == 0 else STEPS)


@pytest.mark.parametrize("kind", ["flux", "qwenimage", "wan"])
def test_two_calls_cfg2(ranks, kind):
    results = ranks(2, "workers.cfg:cfg_equivalence", kind=kind, config={"cfg_size": 2}, steps=STEPS, timeout=300)
    _check_image(results)
    _check_two_calls(results)


def test_sd3_batched_cfg2(ranks):
    results = ranks(2, "workers.cfg:cfg_equivalence", kind="sd3", config={"cfg_size": 2}, steps=STEPS, timeout=300)
    _check_image(results)
    for r in results:  # one process runs both branches in one batch of 2; each group runs one of them
        assert r["reference_batches"] == [2] * STEPS
        assert r["batches"] == [1] * STEPS and r["exchanges"] == STEPS and r["mode"] == "batched"


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_prompt_batch_of_3_on_2_groups(ranks, kind):
    results = ranks(2, "workers.cfg:cfg_equivalence", kind=kind, config={"cfg_size": 2}, batch=3, steps=STEPS,
                    timeout=300)
    _check_image(results)
    if kind == "sd3":  # 6 samples (3 prompts x 2 branches) split 3 / 3
        for r in results:
            assert r["reference_batches"] == [6] * STEPS and r["batches"] == [3] * STEPS
    else:
        _check_two_calls(results, batch=3)


def test_uneven_batch_over_dp_groups(ranks):
    """Guidance off, 3 prompts on 2 groups: 2 and 1 samples, padded for the gather, trimmed, exact."""
    results = ranks(2, "workers.cfg:cfg_equivalence", kind="sd3", config={"cfg_size": 2}, batch=3, guidance=False,
                    steps=STEPS, timeout=300)
    _check_image(results)
    for r in results:
        assert r["reference_batches"] == [3] * STEPS
        assert r["batches"] == [2 if r["group"] == 0 else 1] * STEPS


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_guidance_off_runs_unsplit_and_exact(ranks, kind):
    results = ranks(2, "workers.cfg:cfg_equivalence", kind=kind, config={"cfg_size": 2}, guidance=False,
                    steps=STEPS, timeout=300)
    _check_image(results, exact=True)
    for r in results:  # every rank computed every step whole, as one process does
        assert r["batches"] == r["reference_batches"] == [1] * STEPS
        assert r["exchanges"] == 0


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_cfg2_x_ulysses2(ranks, kind):
    results = ranks(4, "workers.cfg:cfg_equivalence", kind=kind, config={"cfg_size": 2, "ulysses_size": 2},
                    steps=STEPS, timeout=300)
    _check_image(results)
    assert [r["group"] for r in results] == [0, 0, 1, 1]
    if kind == "flux":
        _check_two_calls(results)
    else:
        for r in results:
            assert r["batches"] == [1] * STEPS


def test_batch_split_over_dp_groups(ranks):
    """No cfg_size, world 4 = 2 dp groups x ulysses 2: a batch of 2 prompts splits over the dp groups."""
    results = ranks(4, "workers.cfg:cfg_equivalence", kind="flux", config={"ulysses_size": 2}, batch=2,
                    guidance=False, steps=STEPS, timeout=300)
    _check_image(results)
    for r in results:
        assert r["reference_batches"] == [2] * STEPS and r["batches"] == [1] * STEPS and r["mode"] == "batched"


def test_unrecognised_pipeline_refused_on_every_rank(ranks):
    results = ranks(2, "workers.cfg:refused_pipeline", config={"cfg_size": 2}, timeout=300)
    for r in results:
        assert r["error"] and "StableDiffusion3ControlNetPipeline" in r["error"], r["error"]
        assert "classifier-free guidance" in r["error"]
        assert r["unchanged"] and not r["handle"]


def test_broken_pattern_raises_on_every_rank(ranks):
    results = ranks(2, "workers.cfg:broken_pattern", timeout=300)
    for r in results:
        assert r["error"] and "two cond calls in a row" in r["error"], r["error"]


def test_wrong_guidance_flag_raises_on_every_rank(ranks):
    results = ranks(2, "workers.cfg:wrong_guidance_flag", timeout=300)
    for r in results:
        assert r["error"] and "two cond calls in a row" in r["error"], r["error"]
        assert r["split_from_first_step"] == 1


def _skip_unless_dbcache(pipe):
    """DBCache needs diffusers' block metadata for the model's blocks (SD3's JointTransformerBlock: 0.37+)."""
    try:
        diffpar.plan(pipe, diffpar.DBCacheConfig(Bn_compute_blocks=1))
    except diffpar.UnsupportedError as exc:
        pytest.skip(str(exc))


def test_plan_and_config():
    config = diffpar.ParallelismConfig(parallel_kwargs={"cfg_size": 2})
    assert config.cfg_size == 2 and config.describe()["cfg_size"] == 2
    with pytest.raises(diffpar.DiffparError, match="cfg_size is 1 or 2"):
        diffpar.ParallelismConfig(cfg_size=4)
    from diffpar.testing import tiny_cfg_pipelines

    pipe, _ = tiny_cfg_pipelines.build("flux")
    plan = diffpar.plan(pipe, parallelism_config=diffpar.ParallelismConfig(cfg_size=2, ulysses_size=2), world_size=4)
    assert plan.component("cfg").engine == "cfg parallel (two calls)"
    with pytest.raises(diffpar.DiffparError, match="must use every rank"):
        diffpar.plan(pipe, parallelism_config=diffpar.ParallelismConfig(cfg_size=2), world_size=4)
    # A cache under two-call guidance agrees within a model copy (each branch is its own cache context); under
    # batched guidance over every rank (each forward's batch is split over the groups).
    assert "model copy (2 ranks)" in str(diffpar.plan(pipe, diffpar.DBCacheConfig(),
                                             diffpar.ParallelismConfig(cfg_size=2, ulysses_size=2), world_size=4))
    sd3, _ = tiny_cfg_pipelines.build("sd3", layers=3)
    _skip_unless_dbcache(sd3)
    assert "model copy (4 ranks)" in str(diffpar.plan(sd3, diffpar.DBCacheConfig(),
                                                      diffpar.ParallelismConfig(cfg_size=2, ulysses_size=2),
                                                      world_size=4))
    with pytest.raises(diffpar.DiffparError, match="needs the pipeline"):
        diffpar.plan(pipe.transformer, parallelism_config=diffpar.ParallelismConfig(cfg_size=2), world_size=2)


CACHE_CASES = [
    pytest.param("flux", 2, {"cfg_size": 2}, 0.40, {"layers": 2}, id="flux-two-calls-cfg2"),
    pytest.param("flux", 4, {"cfg_size": 2, "ulysses_size": 2}, 0.40, {"layers": 2}, id="flux-cfg2xulysses2"),
    pytest.param("sd3", 2, {"cfg_size": 2}, 0.36, {"layers": 3}, id="sd3-batched-cfg2"),
    pytest.param("sd3", 4, {"cfg_size": 2, "ulysses_size": 2}, 0.36, {"layers": 3}, id="sd3-cfg2xulysses2"),
]


@pytest.mark.parametrize("kind,world,config,threshold,builder", CACHE_CASES)
def test_cache_under_cfg_skips_the_steps_one_process_skips(ranks, kind, world, config, threshold, builder):
    """Each branch keeps its own cache context; the skip measure is the one-process measure (summed over the
    ranks that together compute one forward), so the same steps are skipped."""
    from tolerances import CACHE_FP32

    from diffpar.testing import tiny_cfg_pipelines

    _skip_unless_dbcache(tiny_cfg_pipelines.build(kind, **builder)[0])
    cache = {"Bn_compute_blocks": 1, "residual_diff_threshold": threshold}
    results = ranks(world, "workers.cfg:cfg_cache_equivalence", kind=kind, config=config, cache=cache,
                    builder=builder, timeout=300)
    for r in results:
        assert r["diff"] <= CACHE_FP32, r["diff"]
        reference = r["reference_decisions"]
        assert any(not c for _, _, c, _ in reference) and sum(c for _, _, c, _ in reference) > 2, reference
        if kind == "sd3":  # batched: every rank decides every step, from the whole batch's measure
            mine = r["decisions"]
            assert r["cache_group_size"] == world
        else:  # two calls: group 0 decides the cond context, group 1 the uncond one
            branch = "cond" if r["group"] == 0 else "uncond"
            mine = [d for d in r["decisions"] if d[0] == branch]
            reference = [d for d in reference if d[0] == branch]
            assert r["computed_forwards"] == 6 + r["group"]  # half the forwards (+ group 1's first cond)
        assert [d[:3] for d in mine] == [d[:3] for d in reference], (mine, reference)
        for (_, _, _, a), (_, _, _, b) in zip(mine, reference):
            assert (a is None) == (b is None) and (a is None or abs(a - b) <= 1e-5 * max(1.0, abs(b))), (a, b)


def test_generate_cfg_flag_sets_cfg_size():
    from diffpar import generate
    from diffpar.testing import tiny_cfg_pipelines

    pipe, _ = tiny_cfg_pipelines.build("flux")
    config = generate.parallelism_config(pipe, generate.parse_args(["/m", "--cfg", "2", "--ulysses", "2"]))
    assert (config.cfg_size, config.ulysses_size) == (2, 2)
    assert generate.parallelism_config(pipe, generate.parse_args(["/m"])).cfg_size is None


@pytest.mark.parametrize("kind", ["ltx", "ltx_i2v"])
@pytest.mark.parametrize("world,config", [(2, {"cfg_size": 2}), (4, {"cfg_size": 2, "ulysses_size": 2})],
                         ids=["cfg2", "cfg2xulysses2"])
def test_ltx_batched_cfg(ranks, kind, world, config):
    """LTX-Video (text- and image-to-video: the latter's per-token timestep splits with the batch): one process
    runs both branches in one batch of 2, each cfg group one of them, within 1e-5 of one process."""
    results = ranks(world, "workers.cfg:cfg_equivalence", kind=kind, config=config, steps=STEPS, timeout=300)
    _check_image(results)
    assert [r["group"] for r in results] == ([0, 1] if world == 2 else [0, 0, 1, 1])
    for r in results:
        assert r["reference_batches"] == [2] * STEPS
        assert r["batches"] == r["again_batches"] == [1] * STEPS and r["exchanges"] == STEPS
        assert r["mode"] == "batched"


@pytest.mark.parametrize("world,config", [(2, {"cfg_size": 2}), (4, {"cfg_size": 2, "ulysses_size": 2})],
                         ids=["cfg2", "cfg2xulysses2"])
def test_wan22_both_experts_split(ranks, world, config):
    """Wan 2.2: `transformer` (2 high-noise steps) and `transformer_2` (2 low-noise steps) each split their guidance
    branches over the cfg groups (and their tokens over Ulysses), within 1e-5 of one process, on two calls."""
    results = ranks(world, "workers.cfg:two_experts_equivalence", config=config, steps=4, timeout=300)
    ulysses = config.get("ulysses_size", 1)
    for r in results:
        for n in ("transformer", "transformer_2"):
            batches, tokens = r["reference_seen"][n]
            assert batches == [1] * 4, (n, batches)  # one process: cond + uncond in each of its 2 steps
            for call, computed in zip(r["calls"], (2 + r["group"], 2)):  # group 1 learns in the first call
                assert call["finite"] and call["diff"] <= PIPELINE_FP32, call["diff"]
                mine_batches, mine_tokens = call["seen"][n]
                assert mine_batches == [1] * computed, (r["rank"], n, mine_batches)
                assert mine_tokens == [tokens[0] // ulysses] * computed, (r["rank"], n, mine_tokens)
            assert r["split_from_first_step"][n] == 1


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_guidance_switched_between_calls(ranks, kind):
    """A guided call, then an unguided one, then a guided one on the same parallel pipeline: the pipeline's own
    flag (Flux: its do_true_cfg, Wan: do_classifier_free_guidance) is read as each call starts, so the unguided
    call runs whole on every rank and exact, and the third call splits from its first step."""
    results = ranks(2, "workers.cfg:guidance_switch", kind=kind, steps=STEPS, timeout=300)
    for r in results:
        first, off, again = r["calls"]
        assert off["diff"] == 0.0 and off["batches"] == [1] * STEPS, off  # whole, as one process
        assert first["diff"] <= PIPELINE_FP32 and again["diff"] <= PIPELINE_FP32, (first, again)
        assert first["batches"] == [1] * (STEPS + r["group"])  # group 1 learns in the first call
        assert again["batches"] == [1] * STEPS  # every group: half the calls of one process
