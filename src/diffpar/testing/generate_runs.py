"""Helpers for the tests that run `python -m diffpar.generate` as a user does: a tiny pipeline saved to disk, the
command's arguments, and the per-rank split lines read back from its output."""
from __future__ import annotations

import json
import os
from pathlib import Path

# What makes the tiny Flux pipeline a valid, fast call (see tiny_pipelines).
TINY_FLUX_CALL = ("--prompt", "a red cat", "--steps", "2", "--height", "32", "--width", "32",
                  "--max-sequence-length", "16", "--guidance-scale", "3.5", "--seed", "3", "--threads", "1")


def save_tiny_flux(folder) -> Path:
    """A tiny FluxPipeline (4 heads: Ulysses and text-encoder TP work on 2 and 4 ranks) written by
    `save_pretrained`, as a user's model folder."""
    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        build_tiny_flux_pipeline(heads=4, layers=2, single_layers=2).save_pretrained(str(folder))
    return folder


def run_in_this_process(folder, out_dir, *extra) -> dict:
    """`diffpar.generate` in this process (a world of one): the float output, the PNG and what was printed.

    HF_HUB_OFFLINE, which the command sets, is put back as it was so it does not leak into other tests."""
    import contextlib
    import io

    import numpy as np

    from diffpar import generate

    out_dir = Path(out_dir)
    previous = os.environ.get("HF_HUB_OFFLINE")
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            code = generate.main([str(folder), *TINY_FLUX_CALL, "--out", str(out_dir / "one.png"),
                                  "--save-array", str(out_dir / "one.npy"), "--report-split", *extra])
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    assert code == 0, buffer.getvalue()
    return {"array": np.load(out_dir / "one.npy"), "png": out_dir / "one.png", "stdout": buffer.getvalue()}


def clean_env(**extra) -> dict:
    """This process's environment without torchrun's variables (a test may itself run under a launcher)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                        "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def split_summaries(stdout: str) -> list[dict]:
    """The SplitProbe summary each rank reported under --report-split, in rank order."""
    from diffpar.generate import SPLIT_MARK

    found = [json.loads(line[len(SPLIT_MARK):]) for line in stdout.splitlines() if line.startswith(SPLIT_MARK)]
    for summary in found:
        summary["group_sizes"] = {k: set(v) for k, v in summary["group_sizes"].items()}
    return sorted(found, key=lambda s: s["rank"])
