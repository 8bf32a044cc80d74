"""`python -m diffpar.generate`: a pipeline saved on disk, run as a user runs it (torchrun, 2 ranks) and checked
against the same command in one process; its options, config file, dry run, outputs and quiet ranks."""
import logging
import subprocess
import sys

import numpy as np
import pytest

from diffpar import generate
from diffpar.testing.generate_runs import (TINY_FLUX_CALL, clean_env, run_in_this_process, save_tiny_flux,
                                           split_summaries)
from diffpar.testing.probes import split_problems
from tolerances import PIPELINE_FP32


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="module")
def one_process(flux_dir, tmp_path_factory):
    """The command in this process, world of one: the reference image and what its transformer saw."""
    return run_in_this_process(flux_dir, tmp_path_factory.mktemp("one"))


def test_two_ranks_under_torchrun_match_one_process(flux_dir, one_process, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         # Each rank's stderr also goes to its own file: which rank drew a progress bar is then plain.
         "--tee", "2", "--log-dir", str(tmp_path / "logs"), "-m",
         "diffpar.generate", str(flux_dir), *TINY_FLUX_CALL, "--ulysses", "2", "--parallel-text-encoder",
         "--parallel-vae", "--out", str(tmp_path / "two.png"), "--save-array", str(tmp_path / "two.npy"),
         "--report-split"],
        capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    array = np.load(tmp_path / "two.npy")
    assert array.shape == one_process["array"].shape == (32, 32, 3)
    assert np.abs(array - one_process["array"]).max() <= PIPELINE_FP32
    assert (tmp_path / "two.png").stat().st_size > 0
    assert "2 process(es)" in out and "saved to" in out
    # The work was split: each rank's transformer saw half the image tokens and exchanged in every attention.
    reference = split_summaries(one_process["stdout"])
    summaries = split_summaries(out)
    assert [s["rank"] for s in summaries] == [0, 1], out
    problems = split_problems(reference[0], summaries, {"ulysses_size": 2})
    assert not problems, problems
    for s in summaries:
        assert 2 * s["image_tokens"][0] == reference[0]["image_tokens"][0]
    # The plan was printed, and per component and rank: the text encoders hold a shard of their weights.
    assert "context-parallel" in out or "ulysses" in out, out
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[1] == "rank" and "parameters" in parts:
            rows[(parts[0], int(parts[2].rstrip(":")))] = float(parts[parts.index("parameters") + 1])
    single = {}
    for line in one_process["stdout"].splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[1] == "rank" and "parameters" in parts:
            single[parts[0]] = float(parts[parts.index("parameters") + 1])
    for rank in (0, 1):
        assert rows[("text_encoder_2", rank)] < single["text_encoder_2"], out
        assert rows[("transformer", rank)] == single["transformer"], out  # CP keeps whole weights
    # Quiet ranks: the loading and denoising bars are rank 0's only. (Counting bars in the joint stderr is not
    # enough: tqdm redraws a finished bar on close when its last update was drawn, which depends on load.)
    stderr_of = {int(p.parent.name): p.read_text() for p in (tmp_path / "logs").rglob("stderr.log")}
    assert sorted(stderr_of) == [0, 1], stderr_of
    assert "Loading pipeline components..." in stderr_of[0], stderr_of[0][-3000:]
    assert "Loading pipeline components..." not in stderr_of[1], stderr_of[1][-3000:]
    assert "it/s]" not in stderr_of[1] and "s/it]" not in stderr_of[1], stderr_of[1][-3000:]


def test_dry_run_prints_the_plan(flux_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert generate.main([str(flux_dir), "--ulysses", "2", "--parallel-text-encoder", "--parallel-vae",
                          "--dry-run", "--world-size", "2"]) == 0
    printed = capsys.readouterr().out
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        assert name in printed, printed
    assert "world 2" in printed or "world_size=2" in printed or "2 ranks" in printed, printed


def test_config_file_and_flags_override(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('model_dir = "/models/flux"\nulysses = 2\nparallel-vae = true\nsteps = 30\nseed = 1\n'
                      'cache = "dbcache"\n')
    args = generate.parse_args(["--config", str(config), "--seed", "7", "--no-parallel-vae"])
    assert (args.model_dir, args.ulysses, args.steps, args.cache) == ("/models/flux", 2, 30, "dbcache")
    assert args.seed == 7 and args.parallel_vae is False  # the flags win
    assert generate.parse_args(["--config", str(config), "/other"]).model_dir == "/other"
    config.write_text("ulyses = 2\n")
    with pytest.raises(SystemExit, match="unknown options.*ulyses"):
        generate.parse_args(["x", "--config", str(config)])


def test_yaml_config_when_pyyaml_is_installed(tmp_path):
    pytest.importorskip("yaml")
    config = tmp_path / "run.yaml"
    config.write_text("model_dir: /m\nring: 2\nparallel_text_encoder: true\n")
    args = generate.parse_args(["--config", str(config)])
    assert (args.model_dir, args.ring, args.parallel_text_encoder) == ("/m", 2, True)


def test_cfg_parallelism_is_refused_clearly():
    with pytest.raises(SystemExit, match="--cfg is 1 or 2"):
        generate.parse_args(["/m", "--cfg", "3"])
    assert generate.parse_args(["/m", "--cfg", "2"]).cfg == 2
    assert generate.parse_args(["/m", "--cfg", "1"]).cfg == 1


def test_not_a_pipeline_folder_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="no model_index.json"):
        generate.main([str(tmp_path), "--dry-run"])


def test_video_is_saved_as_frames_or_gif(tmp_path):
    from PIL import Image

    video = np.random.default_rng(0).random((3, 8, 12, 3), dtype=np.float32)
    frames = generate.save_output(video, str(tmp_path / "clip.png"))
    assert [p.rsplit("/", 1)[1] for p in frames] == ["clip_0000.png", "clip_0001.png", "clip_0002.png"]
    first = np.asarray(Image.open(frames[0]), dtype=np.float32) / 255
    assert np.abs(first - video[0]).max() <= 0.5 / 255 + 1e-6
    (gif,) = generate.save_output(video, str(tmp_path / "clip.gif"))
    assert Image.open(gif).n_frames == 3


def test_quiet_ranks(monkeypatch):
    """Rank 1 raises the libraries' loggers to ERROR and turns the pipeline's bar off (restored on detach);
    rank 0, or DIFFPAR_LOG_ALL_RANKS=1, changes nothing."""
    from diffpar import logs
    from diffpar.handle import ParallelHandle

    class Pipe:
        def set_progress_bar_config(self, **kwargs):
            self._progress_bar_config = kwargs

    names = logs.QUIETED_LOGGERS
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.WARNING)
        monkeypatch.setenv("RANK", "0")
        pipe = Pipe()
        assert logs.quiet_other_ranks(pipe) is False and not hasattr(pipe, "_progress_bar_config")
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv(logs.LOG_ALL_RANKS_ENV, "1")
        assert logs.quiet_other_ranks(pipe) is False
        monkeypatch.delenv(logs.LOG_ALL_RANKS_ENV)
        pipe.set_progress_bar_config(leave=False)
        handle = ParallelHandle(target=pipe)
        assert logs.quiet_other_ranks(pipe, handle) is True
        assert pipe._progress_bar_config == {"leave": False, "disable": True}
        assert all(logging.getLogger(n).level == logging.ERROR for n in names)
        handle.detach()
        assert pipe._progress_bar_config == {"leave": False}
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
