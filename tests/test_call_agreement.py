"""Every call agreed: ranks that call a parallel pipeline (or model) differently get a clear error on every rank,
fast, naming the argument and each rank's value; equal calls run and match one process."""
import os
import subprocess
import sys
import time

import pytest
from diffpar.testing.probes import assert_split
from tolerances import CP_FP32

pytestmark = pytest.mark.compat

# Measured: a refused call returns in well under 1 s on 2-4 CPU ranks (the exchange is two small all-gathers); the
# bound leaves a wide margin for a loaded machine. A hang would run into the test's 120 s deadline instead.
MAX_SECONDS = 20


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("field,values,shown", [
    ("height", [32, 48], ["arguments.height", "rank 0 32", "32, rank 1 48"]),
    ("num_inference_steps", [2, 3], ["arguments.num_inference_steps", "rank 0 2", "rank 1 3"]),
    ("prompt", ["a red fox in snow", "a blue fox in snow"], ["arguments.prompt", "'a red fox in snow'",
                                                             "'a blue fox in snow'"]),
    ("guidance_scale", [3.5, 4.0], ["arguments.guidance_scale", "rank 0 3.5", "rank 1 4.0"]),
    ("num_images_per_prompt", [1, 2], ["arguments.num_images_per_prompt"]),
    ("max_sequence_length", [16, 12], ["arguments.max_sequence_length"]),
])
def test_pipeline_called_differently_fails_on_every_rank(ranks, world, field, values, shown):
    results = ranks(world, "workers.calls:pipeline_call_differs", timeout=120, field=field, values=values)
    for r in results:
        assert r["error"] == "RankMismatchError", r
        assert "a call of FluxPipeline(...)" in r["message"] and "rank 1 differs from rank 0" in r["message"], r
        for fragment in shown:
            assert fragment in r["message"], (fragment, r["message"])
        assert r["seconds"] < MAX_SECONDS, r
        assert r["calls_agreed"] == 1  # the refused call was not counted; the equal one after it ran


def test_equal_calls_run_and_are_agreed_once_each(ranks):
    for r in ranks(2, "workers.calls:pipeline_calls_agree", timeout=120):
        assert r["diff"] <= CP_FP32, r
        assert r["calls_agreed"] == 2, r  # one exchange per pipeline call, not per step


def test_random_states_are_rank_0s_without_the_argument_check(ranks):
    """check_every_call=False skips the arguments' agreement, not the random states: each rank seeds its generator
    and its global random state differently, and every rank still makes rank 0's image."""
    results = ranks(2, "workers.calls:random_states_without_argument_check", timeout=120)
    assert_split(results, {"ulysses_size": 2})  # the pipeline ran parallel, not whole on every rank
    for r in results:
        assert r["diff"] <= CP_FP32, r
        assert r["calls_agreed"] == 0, r  # no argument agreement was made
        assert r["global_states_equal"], r  # ranks > 0 continue from rank 0's global random state


@pytest.mark.parametrize("check_every_call", [True, False])
@pytest.mark.parametrize("seed_per_rank", [False, True])
def test_one_exchange_per_call(ranks, check_every_call, seed_per_rank):
    """A call's agreement (arguments' fingerprint and the random states themselves) is one exchange (a sum
    all-reduce of every rank's row), issued at the call's start and settled at prepare_latents, so its round trip
    overlaps the call's first lines (tokenizing, text encoding). Each rank seeding its own generator needs nothing
    more: rank 0's states came with the exchange."""
    results = ranks(2, "workers.calls:exchanges_before_the_call", timeout=120, check_every_call=check_every_call,
                    seed_per_rank=seed_per_rank)
    assert_split(results, {"ulysses_size": 2})
    for r in results:
        # issued before the pipeline's first line, not waited for
        assert r["before_call"] == {"exchange": 1}, r
        assert r["deferred_calls"] == 2, r  # both calls' exchanges were settled late
        # Then the model's own collectives: no broadcast of random states (they came with the exchange), nor of
        # FLUX's prepare_latents outputs (the initial latents and their position ids: drawn from agreed states,
        # they are rank 0's).
        assert r["order"][0] == "exchange" and "exchange" not in r["order"][1:], r
        assert "broadcast" not in r["order"], r
        assert r["diff"] <= CP_FP32, r  # rank 0's image on every rank, broadcast or not
        assert r["calls_agreed"] == (2 if check_every_call else 0), r


@pytest.mark.parametrize("world, generators", [(2, 1), (4, 1), (2, 2)])
def test_each_ranks_own_seeds_give_rank_0s_images(ranks, world, generators):
    """Each rank seeds its own generators and its own global random state: every rank makes rank 0's images. One
    generator's states (with the global one) travel inside the call's one exchange and are compared byte for byte
    (no broadcast, at 4 ranks three of them differ); two generators' do not fit its room: their digest travels,
    then one broadcast of rank 0's states."""
    results = ranks(world, "workers.calls:generators_of_each_rank", timeout=180, generators=generators)
    assert_split(results, {"ulysses_size": world})
    for r in results:
        assert r["diff"] <= CP_FP32, r
        assert r["exchanges"] == 1, r
        assert len(r["broadcasts"]) == (0 if generators == 1 else 1), r
        assert r["global_states_equal"], r  # ranks > 0 continue from rank 0's global random state


def test_latents_passed_per_rank_are_still_broadcast(ranks):
    """Latents are compared by shape only, so latents of each rank's own (rank 1's differ) are made rank 0's by the
    broadcast at prepare_latents, which stays whenever prepare_latents is given a tensor: the image is the
    one-process image from rank 0's latents, and the caller's own tensor is left as it was."""
    results = ranks(2, "workers.calls:latents_of_each_rank_become_rank_0s", timeout=120)
    assert_split(results, {"ulysses_size": 2})
    assert results[1]["own_differs"], results
    for r in results:
        assert len(r["broadcasts"]) == 2 and r["broadcasts"][0][0] == 1, r  # the latents, then their position ids
        assert r["own_untouched"], r  # received into a copy: the caller's tensor keeps its values
        assert r["diff"] <= CP_FP32, r


def test_generators_differing_in_number_are_a_clear_error_without_the_argument_check(ranks):
    for r in ranks(2, "workers.calls:random_states_without_argument_check", mismatch=True, timeout=120):
        assert r["error"] == "DiffparError", r
        assert "generator" in r["message"] and "every rank must pass the same generators" in r["message"], r
        assert r["seconds"] < MAX_SECONDS, r


@pytest.mark.parametrize("world", [2, 4])
def test_different_weights_are_refused_at_enable_naming_the_module(ranks, world):
    for r in ranks(world, "workers.calls:weights_differ_at_enable", timeout=120):
        assert r["error"] == "RankMismatchError", r
        assert "denoiser:transformer.facts.weights" in r["message"] and "vae:vae.facts.weights" in r["message"], r
        assert "load the same checkpoint on every rank" in r["message"], r
        assert r["seconds"] < MAX_SECONDS, r


def test_weights_changed_on_one_rank_after_enable(ranks):
    """Opt-in `verify_weights=True` names the module at the next call; without it the call runs (documented)."""
    for r in ranks(2, "workers.calls:weights_changed_after_enable", timeout=120, verify=True):
        assert r["error"] == "RankMismatchError", r
        assert "arguments.weights.transformer" not in r["message"]  # weights are their own field
        assert "weights.transformer" in r["message"] and "weights.vae" not in r["message"], r["message"]
    for r in ranks(2, "workers.calls:weights_changed_after_enable", timeout=120, verify=False):
        assert r["error"] is None, r


@pytest.mark.parametrize("world", [2, 4])
def test_bare_model_called_with_different_shapes(ranks, world):
    results = ranks(world, "workers.calls:model_inputs_differ", timeout=120, seq_by_rank=[16, 24])
    for r in results:
        assert r["error"] == "RankMismatchError", r
        assert "a call of FluxTransformer2DModel.forward" in r["message"], r
        assert "arguments.hidden_states.shape" in r["message"], r
        assert r["calls_agreed"] == 0
    for r in ranks(world, "workers.calls:model_inputs_differ", timeout=120, seq_by_rank=[16]):
        assert r["error"] is None and r["calls_agreed"] == 1, r


def test_rank_that_never_calls_bounds_the_wait(ranks):
    from diffpar.testing import RankFailure

    started = time.monotonic()
    with pytest.raises(RankFailure) as err:
        ranks(2, "workers.calls:rank_skips_the_call", timeout=120, timeout_s=3.0)
    elapsed = time.monotonic() - started
    text = str(err.value)
    assert "1 rank(s) failed" in text and "a call of FluxPipeline(...): waited 3 s for the other ranks" in text, text
    assert "ParallelismConfig(timeout_s=...)" in text
    assert elapsed < 3.0 + MAX_SECONDS


def test_torchrun_variables_without_peers_fail_after_the_timeout(tmp_path):
    """Plain `python app.py` with leftover RANK/WORLD_SIZE/MASTER_* variables: a clear error, not a silent block."""
    script = tmp_path / "app.py"
    script.write_text(
        "import diffpar\n"
        "from diffpar.testing import tiny_transformers\n"
        "model, _ = tiny_transformers.build('flux')\n"
        "diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=2, timeout_s=3))\n"
    )
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29613", LOCAL_RANK="0")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert "the other ranks did not join within 3 s" in proc.stderr, proc.stderr[-2000:]
    assert "RANK=0, WORLD_SIZE=2, MASTER_ADDR=127.0.0.1, MASTER_PORT=29613" in proc.stderr
    assert elapsed < 3 + 60, elapsed  # interpreter start and imports included


@pytest.mark.parametrize("exchange_in_flight", [False, True], ids=["arrived", "in_flight"])
def test_a_draw_before_the_first_parallel_step_runs_the_call_again_from_rank_0s_states(ranks, exchange_in_flight):
    """The exchange is settled at the call's first parallel step (here prepare_latents), so a random draw before
    it used each rank's own state when the states differed: a rank whose states were not rank 0's runs the call
    again from rank 0's states (on its own: the states came with the exchange, and no collective ran since), so the
    draw is rank 0's everywhere and the image one process's; that rank's later calls agree at their start. Rank 0
    drew from its own states, which are rank 0's: it goes on. The same whether the exchange had arrived at
    prepare_latents or was still in flight there (the noise then drawn first, the restart found at the transformer):
    what rank 1 learns is the draw before prepare_latents either way, not the timing."""
    results = ranks(2, "workers.calls:draw_before_the_first_parallel_step", timeout=120,
                    exchange_in_flight=exchange_in_flight)
    assert_split(results, {"ulysses_size": 2})
    for r in results:
        assert r["first"]["error"] is None and r["second"]["error"] is None, r
        assert r["first"]["seconds"] < MAX_SECONDS + (0.5 if exchange_in_flight else 0), r
        restarted = r["rank"] == 1
        assert r["restarts"] == int(restarted) and r["draws_early"] == restarted, r
        assert not r["settles_at_prepare"], r
        if restarted:
            assert r["speculated"] == int(exchange_in_flight), r
        assert r["deferred_calls"] == (1 if restarted else 2), r  # after its restart, rank 1 agrees at the start
        assert r["calls_agreed"] == 2, r  # the restart did not agree again
        assert r["diff"] <= CP_FP32, r
    rank0, rank1 = results[0]["draws"]  # each rank's draws, in order: rank 0 [first call, second call], rank 1
    assert rank0[0] != rank1[0], (rank0, rank1)  # [attempt, restart, second call]; the attempt: its own state
    assert rank1[1] == rank0[0], (rank0, rank1)  # the restart: rank 0's first draw
    assert rank1[2] == rank0[1], (rank0, rank1)  # the second call: rank 0's states since


@pytest.mark.parametrize("seed_per_rank", [False, True])
def test_noise_drawn_before_the_exchange_arrives(ranks, seed_per_rank):
    """With the exchange still in flight at prepare_latents (prompt embeddings given, rank 0 late), rank 1 draws its
    noise first and settles at the transformer: the round trip overlaps that work too. Its states differing from
    rank 0's (a seed per rank), it runs the call again from rank 0's states on its own, and settles at
    prepare_latents from then on. Rank 0's image and the one-process image on every rank either way."""
    results = ranks(2, "workers.calls:noise_drawn_before_the_exchange_arrives", timeout=120,
                    seed_per_rank=seed_per_rank)
    assert_split(results, {"ulysses_size": 2})
    for r in results:
        assert r["diff"] <= CP_FP32, r
        assert not r["draws_early"], r
        if r["rank"] == 1:
            assert r["speculated"] == 1, r
            assert r["restarts"] == int(seed_per_rank) and r["settles_at_prepare"] == seed_per_rank, r
        else:
            assert r["restarts"] == 0, r  # rank 0's noise is rank 0's


def test_keywords_in_another_order_are_the_same_call(ranks):
    results = ranks(2, "workers.calls:keywords_in_another_order", timeout=120)
    assert_split(results, {"ulysses_size": 2})
    for r in results:
        assert r["diff"] <= CP_FP32, r
        assert r["calls_agreed"] == 1, r


def test_a_rank_that_raises_before_the_settle_point_still_agrees(ranks):
    """The exchange is in flight while the pipeline runs its first lines; a rank whose call raises there settles it
    on the way out, so both ranks report the mismatch (the cause), quickly, and later calls pair up."""
    results = ranks(2, "workers.calls:one_rank_raises_before_the_settle_point", timeout=120)
    for r in results:
        assert r["error"] == "RankMismatchError", r
        assert "arguments.prompt" in r["message"] and "rank 1 None" in r["message"], r
        assert r["seconds"] < MAX_SECONDS, r
        assert r["calls_agreed"] == 1, r
    assert results[1]["cause"] == "ValueError", results[1]  # rank 1's own error, chained
    assert results[0]["cause"] is None, results[0]


def test_compiled_modules_make_the_call_agree_at_its_start():
    """A compiled module's hooks were traced: the settle points inside it would not run, so a pipeline holding one
    waits for the exchange at the call's start (one process: only the decision is checked)."""
    import torch
    from diffpar.engines.call_agreement import CallChecker

    class Pipe:
        pass

    pipe = Pipe()
    pipe.transformer = torch.nn.Linear(2, 2)
    pipe.vae = torch.nn.Linear(2, 2)
    checker = CallChecker("Pipe(...)")
    checker.pipeline_can_defer = True
    assert checker.defers(pipe, None)
    pipe.transformer.compile()  # in place: lazy, nothing is traced until called
    assert not checker.defers(pipe, None)
    pipe.transformer = torch.compile(torch.nn.Linear(2, 2))  # a wrapper put in the module's place
    assert not checker.defers(pipe, None)
    checker.overlap = False
    pipe.transformer = torch.nn.Linear(2, 2)
    assert not checker.defers(pipe, None)
