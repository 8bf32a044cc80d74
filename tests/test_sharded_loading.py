"""Sharded loading (`ParallelismConfig.weights_from`): modules built on the meta device, each rank reading only
its tensor-parallel shards from safetensors files (engines/sharded_loading.py).

Multi-rank: a tiny Flux pipeline (transformer, CLIP and T5 text encoders) saved with save_pretrained, rebuilt
on meta, enabled with tp 2 (world 2) and Ulysses 2 x tp 2 (world 4): outputs match the normally loaded model in
one process; each rank read exactly its plan's bytes (a fraction of the sharded weights plus the replicated
ones), never a sharded weight whole, and no op created a tensor of a sharded weight's full shape.
The recipe (docs/loading.md): a tiny Flux pipeline saved with save_pretrained, rebuilt by diffpar.empty_pipeline
and enabled with weights_from="auto" on 2 ranks: the image matches FluxPipeline.from_pretrained in one process, with
the same per-rank reads; a failure right after the loading step (on one rank or on both) rolls every rank back to
the meta modules, fast, and the pipeline then enables normally.
One process: every plan-time refusal names what is wrong; empty_pipeline reads no weight of a module it builds
empty.
The benchmark (benchmarks/bench_sharded_loading.py) in its CPU mode with toy widths, 2 ranks under torchrun: the
path a GPU run takes, the CPU as the device; the peak of live device bytes while enabling is the shard plus at most
one tensor, well under the whole model.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from tolerances import PIPELINE_FP32, TP_FP32, TRANSFORMER_TP_FP32

import diffpar
from diffpar.compat.diffusers_cp import uneven_split_option
from diffpar.errors import DiffparError
from diffpar.testing.probes import assert_split

# The tiny prompt has 7 tokens: splitting it needs diffusers' uneven Ulysses split (0.37+; 0.36 refuses clearly,
# tests/test_any_input.py).
_ODD_TEXT = pytest.mark.skipif(uneven_split_option(2, 1) is None, reason="7 prompt tokens need the uneven split")
CONFIGS = [
    pytest.param(2, {"tp_size": 2}, id="tp2"),
    pytest.param(4, {"ulysses_size": 2, "tp_size": 2}, id="ulysses2xtp2", marks=_ODD_TEXT),
    # Context parallel only: the transformer is read whole on every rank, the text encoders still by shards.
    pytest.param(2, {"ulysses_size": 2}, id="ulysses2", marks=_ODD_TEXT),
]


@pytest.mark.parametrize("world,config", CONFIGS)
def test_meta_pipeline_reads_only_its_shards(ranks, tmp_path, world, config):
    results = ranks(world, "workers.sharded_loading:load_and_compare", directory=str(tmp_path), config=config)
    tp = config.get("tp_size", 1)
    for r in results:
        assert r["diff"] <= TRANSFORMER_TP_FP32, (r["rank"], r["diff"])
        assert max(r["embed_diffs"]) <= TP_FP32, (r["rank"], r["embed_diffs"])
        assert r["forbidden_shapes"] > 0 and r["full_size_allocations"] == [], r["full_size_allocations"]
        for name, m in r["modules"].items():
            assert m["meta_left"] == [], (name, m["meta_left"])
            if name == "transformer" and tp == 1:
                assert m["sliced_count"] == 0 and m["read_bytes"] == m["full_bytes"] == m["plan_bytes"], m
                continue
            split = world if name.startswith("text_encoder") else tp
            assert m["sliced_count"] > 0 and m["sliced_whole"] == [], (name, m["sliced_whole"])
            # What the files gave this rank is what its plan says and what the module now holds.
            assert m["read_bytes"] == m["state_bytes"] == m["plan_bytes"], (name, m)
            # The split weights are most of each module: a rank reads well under the whole.
            assert m["read_bytes"] < m["full_bytes"] * (1 - 0.5 * (1 - 1 / split)), (name, m)
        assert r["modules"]["transformer"]["held_bytes"] == r["modules"]["transformer"]["read_bytes"]
        # Text encoders never had their full weights: detach says to reload them; the transformer gathers.
        assert r["detach_error"] and "text_encoder" in r["detach_error"]
        assert r["detach_equal"]
    assert_split(results, config)


@pytest.mark.parametrize("where", ["after", "during"])
def test_failure_rolls_back_to_meta(ranks, tmp_path, where):
    results = ranks(2, "workers.sharded_loading:rollback_leaves_meta", directory=str(tmp_path),
                    config={"tp_size": 2}, where=where)
    for r in results:
        assert r["error"] and ("injected failure" in r["error"] or "rank 1 failed" in r["error"]), r["error"]
        assert r["structure_equal"] and r["all_meta"], r
        if where == "during":
            assert r["reads"] >= 80, r


# -- the recipe: diffpar.empty_pipeline(saved directory) + weights_from="auto" (docs/loading.md) -----------------
@pytest.mark.parametrize("config", [pytest.param({"tp_size": 2}, id="tp2"),
                                    pytest.param({"ulysses_size": 2}, id="ulysses2")])
def test_recipe_from_a_saved_pipeline_directory(ranks, tmp_path, config):
    """save_pretrained -> empty_pipeline -> enable_cache(tp 2 or Ulysses 2, text encoders by shards, VAE split)
    -> call. With context parallelism only, the transformer is read whole on each rank."""
    results = ranks(2, "workers.sharded_loading:recipe_from_directory", directory=str(tmp_path), config=config)
    for r in results:
        assert all(r["built_meta"].values()), r["built_meta"]
        assert r["loaded"] == ["text_encoder", "text_encoder_2", "transformer"], r["loaded"]
        assert r["vae_engine"] != "none", r["vae_engine"]  # the VAE (read whole by from_pretrained) is split too
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"])
        assert r["forbidden_shapes"] > 0 and r["full_size_allocations"] == [], r["full_size_allocations"]
        for name, m in r["modules"].items():
            assert m["meta_left"] == [] and m["read_bytes"] == m["state_bytes"] == m["plan_bytes"], (name, m)
            if name == "transformer" and "tp_size" not in config:
                assert m["sliced_count"] == 0 and m["read_bytes"] == m["full_bytes"], m
                continue
            assert m["sliced_count"] > 0 and m["sliced_whole"] == [] and m["read_bytes"] < m["full_bytes"], (name, m)
    # The ranks read different slices: together more than one rank, each less than the whole.
    assert_split(results, config)


# Measured: a rolled-back enable_cache returns in about 2 s on 2 CPU ranks; a hang would reach the 60 s timeout.
MAX_ROLLBACK_SECONDS = 30


@pytest.mark.parametrize("who", ["one", "all"])
def test_failure_after_the_loading_step_rolls_back_every_rank(ranks, tmp_path, who):
    """The injection of tests/test_rollback.py, for the loading step (which needs a meta-built pipeline, so it is
    not in applying.APPLY_STEPS): the step fails right after every module was read, on rank 1 or on both."""
    fail_ranks = [1] if who == "one" else [0, 1]
    results = ranks(2, "workers.sharded_loading:fail_after_loading", timeout=120, directory=str(tmp_path),
                    config={"tp_size": 2}, fail_ranks=fail_ranks)
    for r in results:
        assert r["loaded"] == ["transformer", "text_encoder", "text_encoder_2"], r["loaded"]  # the step ran
        assert r["error"] is not None, f"rank {r['rank']} did not raise"
        if r["rank"] in fail_ranks:
            assert "injected failure after the loading step" in r["error"], r["error"]
        else:
            assert "rank 1 failed while applying the agreed plan" in r["error"], r["error"]
        assert r["seconds"] < MAX_ROLLBACK_SECONDS, r
        assert r["changed_parameters"] == [] and r["changed_structure"] == [], r
        assert not r["shims_active"], r
        assert r["second_diff"] <= PIPELINE_FP32, r


def test_empty_pipeline_reads_no_weight_of_an_empty_module(tmp_path):
    """The empty modules' weight files are garbage here: empty_pipeline never opens them, and the rest loads."""
    from diffpar.testing import tiny_pipelines

    tiny_pipelines.build_tiny_flux_pipeline().save_pretrained(tmp_path)
    saved = {file: file.read_bytes() for name in ("transformer", "text_encoder_2")
             for file in (tmp_path / name).glob("*.safetensors")}
    for file in saved:
        file.write_bytes(b"not a safetensors file")
    pipe = diffpar.empty_pipeline(tmp_path, ["transformer", "text_encoder_2"])
    for file, data in saved.items():  # the plan below reads the headers
        file.write_bytes(data)
    for name in ("transformer", "text_encoder_2"):
        assert all(p.is_meta for p in getattr(pipe, name).parameters()), name
    assert not any(p.is_meta for name in ("vae", "text_encoder") for p in getattr(pipe, name).parameters())
    assert type(pipe).__name__ == "FluxPipeline" and pipe.tokenizer is not None and pipe.scheduler is not None
    # "auto" resolves to each empty module's own subfolder; the denoisers are the default.
    plan = diffpar.plan(pipe, parallelism_config=diffpar.ParallelismConfig(
        tp_size=2, extra_parallel_modules=["text_encoder_2"], weights_from="auto"), world_size=2)
    assert {c.name: c.payload.reads[0].file.split(os.sep)[-2] for c in plan.by_role("weights")} == \
        {"transformer": "transformer", "text_encoder_2": "text_encoder_2"}
    assert [n for n, m in diffpar.empty_pipeline(tmp_path).components.items()
            if isinstance(m, torch.nn.Module) and any(p.is_meta for p in m.parameters())] == ["transformer"]


def test_empty_pipeline_and_auto_refusals(tmp_path):
    from diffpar.testing import tiny_pipelines

    with pytest.raises(DiffparError, match="no model_index.json"):
        diffpar.empty_pipeline(tmp_path)
    reference = tiny_pipelines.build_tiny_flux_pipeline()
    reference.save_pretrained(tmp_path)
    with pytest.raises(DiffparError, match="no component 'unet'"):
        diffpar.empty_pipeline(tmp_path, ["unet"])
    with pytest.raises(DiffparError, match="only model weights"):
        diffpar.empty_pipeline(tmp_path, ["scheduler"])
    # A pipeline diffpar did not build empty: "auto" has nothing to load, and says what to do.
    with pytest.raises(DiffparError, match="empty_pipeline"):
        _plan(reference, "auto")
    # In one process weights_from is not applied: the same script runs on a normally loaded pipeline.
    single = diffpar.plan(reference, parallelism_config=diffpar.ParallelismConfig(tp_size=2, weights_from="auto"),
                          world_size=1)
    assert any("weights_from is not applied" in note for note in single.notes), single.notes
    # A text encoder built empty but not in extra_parallel_modules: named.
    pipe = diffpar.empty_pipeline(tmp_path, ["transformer", "text_encoder_2"])
    with pytest.raises(DiffparError, match="text_encoder_2"):
        _plan(pipe, "auto")
    assert diffpar.ParallelismConfig(weights_from="auto").describe()["weights_from"] == "auto"


# -- one process: plan-time refusals ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from diffpar.testing import tiny_pipelines

    directory = tmp_path_factory.mktemp("weights")
    reference = tiny_pipelines.build_tiny_flux_pipeline()
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        getattr(reference, name).save_pretrained(directory / name)
    return reference, directory


def _plan(pipe, weights_from, **config):
    config.setdefault("tp_size", 2)
    return diffpar.plan(pipe, parallelism_config=diffpar.ParallelismConfig(weights_from=weights_from, **config),
                        world_size=2)


def _meta(reference, **kwargs):
    from workers.sharded_loading import _meta_pipeline

    return _meta_pipeline(reference, **kwargs)


def test_plan_reports_bytes_per_rank(saved):
    reference, directory = saved
    pipe = _meta(reference, names=("transformer",))
    plan = _plan(pipe, {"transformer": str(directory / "transformer")})
    weights = plan.by_role("weights")[0]
    load = weights.payload
    assert weights.engine == "sharded loading" and "sharded loading" in str(plan)
    assert load.bytes_per_rank[0] < load.full_bytes and len(load.sharded_keys) > 0
    # The same accounting as the tensor-parallel plan (the transformer has no tied weights).
    assert max(load.bytes_per_rank) == plan.by_role("denoiser")[0].weight_bytes_per_rank
    # "device" is where the weights go, not a component; it stays out of what the ranks compare.
    placed = _plan(pipe, {"transformer": str(directory / "transformer"), "device": "cpu"})
    assert [c.payload.device for c in placed.by_role("weights")] == ["cpu"]
    assert placed.describe()["weights:transformer"] == plan.describe()["weights:transformer"]
    # A file path works as well as its directory.
    file = directory / "transformer" / "diffusion_pytorch_model.safetensors"
    assert _plan(pipe, {"transformer": str(file)}).by_role("weights")[0].payload.full_bytes == load.full_bytes


def test_refusals_name_the_problem(saved, tmp_path):
    from safetensors.torch import save_file

    reference, directory = saved
    pipe = _meta(reference)
    good = {n: str(directory / n) for n in ("transformer", "text_encoder", "text_encoder_2")}
    extras = {"extra_parallel_modules": ["text_encoder", "text_encoder_2"]}
    with pytest.raises(DiffparError, match="does not exist"):
        _plan(pipe, {"transformer": str(tmp_path / "missing")})
    # Files of another model: the first tensor that differs is named.
    state = {k: v for k, v in reference.transformer.state_dict().items()}
    key = "x_embedder.weight"
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 1)
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(DiffparError, match=r"x_embedder\.weight has shape"):
        _plan(pipe, {"transformer": str(tmp_path / "other.safetensors")})
    state = {k: v.contiguous() for k, v in reference.transformer.state_dict().items() if k != "proj_out.weight"}
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(DiffparError, match=r"proj_out\.weight .* in none of the files"):
        _plan(pipe, {"transformer": str(tmp_path / "short.safetensors")})
    # A module that is already loaded is not overwritten.
    loaded = _meta(reference, names=("text_encoder",))
    with pytest.raises(DiffparError, match="already loaded"):
        _plan(loaded, {"transformer": good["transformer"]})
    with pytest.raises(DiffparError, match="neither a denoiser nor a text encoder"):
        _plan(pipe, {"transformer": good["transformer"], "vae": good["transformer"]})
    with pytest.raises(DiffparError, match="nothing to keep"):
        _plan(pipe, good, keep_original_text_encoders=True, **extras)
    # torch.device("meta") also puts CLIP's position ids (not saved) on meta: init_empty_weights is needed.
    on_meta = _meta(reference, names=("text_encoder",), on_meta_device=True)
    with pytest.raises(DiffparError, match="init_empty_weights"):
        _plan(on_meta, {"text_encoder": good["text_encoder"]}, extra_parallel_modules=["text_encoder"])
    with pytest.raises(DiffparError, match="weights_from"):
        diffpar.ParallelismConfig(weights_from=["transformer"])
    assert diffpar.ParallelismConfig(parallel_kwargs={"weights_from": good}).weights_from == good
    # Every check passes on the good files.
    assert len(_plan(pipe, good, **extras).by_role("weights")) == 3


def test_meta_without_weights_from_is_still_refused(saved):
    from diffpar.errors import UnsupportedError

    reference, _ = saved
    with pytest.raises(UnsupportedError, match="meta device"):
        _plan(_meta(reference, names=("transformer",)), {})


# -- the benchmark's device-memory figure, CPU mode (the GPU command runs the same code with --device cuda) --------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_peak_device_memory_is_the_shard_plus_one_tensor(tmp_path):
    """A subprocess: torchrun starts the 2 ranks, as on the GPU (`--device cuda` differs only in the device and in
    also reading torch.cuda.max_memory_allocated)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "benchmarks", "bench_sharded_loading.py"), "--device", "cpu", "--small",
         "--dir", str(tmp_path / "pipeline")],
        capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["failed"] == [] and summary["device"] == "cpu" and summary["world"] == 2
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        m = r["memory"]
        # The shard was really put on the device, and nothing but small tensors beside it; loading the whole model
        # (what a no-op split does) would break the bound.
        assert m["shard"] <= m["peak"] <= m["shard"] + m["largest_tensor"], m
        assert m["peak"] == m["live_peak"] and m["bound"] < m["whole"] and m["shard"] < 0.7 * m["whole"], m
        assert 0 < m["largest_tensor"] < m["shard"], m
        for name, d in r["modules"].items():
            assert d["read"] == d["plan"] == d["held"] < d["full"] and d["sliced"] > 0, (name, d)
            assert d["on_device"] == ["cpu"], d
        # The tensor-parallel forward ran split: each rank's first attention holds half of the 4 heads, and the
        # row-parallel sums were all-reduced over both ranks.
        split = r["forward"]["split"]
        assert split["heads"] == [2] and split["collectives"]["c10d.all_reduce"] > 0, split
        assert split["group_sizes"]["c10d.all_reduce"] == [2], split
        assert r["forward"]["finite"]
    assert ranks[0]["modules"] == ranks[1]["modules"]
    for name, d in ranks[0]["forward"]["vs_whole"].items():
        assert 0 < d["max_abs"] and d["relative"] <= 5e-2, (name, d)
    text = done.stdout
    assert "peak device memory while enabling" in text and "checks: " in text


def test_loading_map_covers_every_sliced_parameter_of_every_real_configuration():
    """What sharded loading reads as slices (`_sliced_dims`) is exactly what tensor parallelism slices, for every
    real configuration with a TP plan at tp 2 and 4 (meta device): the bytes a rank would read equal the plan's
    bytes for that rank. A shard kind the loader does not know (a LayerNorm's bias, a per-head gate, packed expert
    weights) would be read whole and show here."""
    import importlib.util

    import diffusers

    import diffpar.families.catalog  # noqa: F401
    from diffpar.engines.sharded_loading import _sliced_dims
    from diffpar.engines.tp_shard import total
    from diffpar.errors import UnsupportedError
    from diffpar.families.transformers import tp_plans

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_tp_real.py")
    spec = importlib.util.spec_from_file_location("bench_tp_real", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    checked, available, mismatches = 0, 0, []
    for label, (cls_name, config) in sorted(bench.real_configs().items()):
        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            continue
        available += 1
        with torch.device("meta"):
            model = cls(**config)
        for tp in (2, 4):
            try:
                plan = tp_plans.shard_plan_for(model, tp)
            except UnsupportedError:
                continue
            want = plan.weight_bytes(model, bytes_per_element=2)["per_rank_all"]
            sliced = _sliced_dims(plan)
            got = [0] * tp
            for name, p in model.named_parameters():
                if name in sliced:
                    dim, ranges = sliced[name]
                    for r in range(tp):
                        got[r] += total(ranges[r]) * (p.numel() // p.shape[dim]) * 2
                else:
                    for r in range(tp):
                        got[r] += p.numel() * 2
            checked += 1
            if got != want:
                mismatches.append((label, tp, got, want))
    # Every configuration this release has (67 on 0.42.1) has a TP plan now, at both degrees.
    assert checked == 2 * available and available > 0, (checked, available)
    assert mismatches == [], mismatches
