"""What the end-to-end pipeline workers share: the run of a pipeline in one process and then under `enable_cache`
on every rank, and the report of it on this rank (the image or video against the one-process one, ranks against
each other, what each parallel extra module held or did). One copy here serves every image and video worker, so
the tests read the same fields under the same names everywhere."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing.probes import SplitProbe


@dataclass
class Runs:
    """What `against_one_process` ran, on this rank."""
    reference: Any  # the one-process output (seed 0)
    out: Any  # this rank's first parallel output
    again: Any  # a second parallel call's output, or None where the worker makes none
    probe: SplitProbe  # the denoiser during the first parallel call
    reference_probe: SplitProbe  # the denoiser during the one-process call
    steps: list  # the applied steps' names (read before detach, which clears them)
    collected: dict  # parallel_module_states and what `collect(handle)` read, before detach
    detach_problems: list

    def fields(self) -> dict:
        """The report fields beside the comparison: applied steps, collected states, detach problems."""
        return {"steps": self.steps, **self.collected, "detach_problems": self.detach_problems}

    def image_report(self, **extra) -> dict:
        """image_report of these runs (with the repeat call's difference where there was one)."""
        return image_report(self.out, self.again, self.reference, self.probe, self.reference_probe,
                            **self.fields(), **extra)

    def video_report(self, **extra) -> dict:
        """image_report of one video call, and where `run` returned (frames, audio) (LTX-2 also makes sound) the
        waveform vs one process ("audio_diff"; None without audio)."""
        out, reference, audio_diff = self.out, self.reference, None
        if isinstance(out, tuple):
            (out, audio), (reference, reference_audio) = out, reference
            audio_diff = None if audio is None else (audio - reference_audio).abs().max().item()
        return image_report(out, None, reference, self.probe, self.reference_probe, audio_diff=audio_diff,
                            **self.fields(), **extra)


class LatestBuild:
    """For builders that return (pipeline, make_call): `build()` gives against_one_process the pipeline and keeps
    its `make_call` (the call arguments of the pipeline that runs next) for the worker's `run`."""

    def __init__(self, build_pair: Callable):
        self._build_pair = build_pair
        self.make_call = None

    def build(self):
        pipe, self.make_call = self._build_pair()
        return pipe


def against_one_process(build: Callable, run: Callable, config: dict, names, seed: int, repeat: bool = False,
                        denoiser: str = "transformer", collect: Callable | None = None) -> Runs:
    """`build()` gives a fresh pipeline, `run(pipe, seed)` its output. The pipeline runs in one process (seed 0),
    then a fresh one under `enable_cache` with `config` and the components `names` as extra parallel modules runs
    with `seed` (twice with `repeat`), the denoiser under a SplitProbe in the first call of each. Before the handle
    is detached: parallel_module_states and the fields `collect(handle)` reads. Detach also runs on error (no shim
    may outlive the test)."""
    reference_pipe = build()
    with torch.no_grad(), SplitProbe(getattr(reference_pipe, denoiser)) as reference_probe:
        reference = run(reference_pipe, 0)
    del reference_pipe
    pipe = build()
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
        **dict(config, extra_parallel_modules=[getattr(pipe, name) for name in names])))
    try:
        with torch.no_grad():
            with SplitProbe(getattr(pipe, denoiser)) as probe:
                out = run(pipe, seed)
            again = run(pipe, seed) if repeat else None
        steps = list(handle.step_names)
        collected = {**parallel_module_states(handle, names), **(collect(handle) if collect is not None else {})}
    finally:
        problems = handle.detach(strict=False)
    return Runs(reference, out, again, probe, reference_probe, steps, collected, problems)


def parallel_module_states(handle, names) -> dict:
    """What every end-to-end run reports of its extra modules: the VAE split's calls ("vae_calls", None without a
    split VAE) and each tensor-parallel text encoder's share ("text_encoders")."""
    return {"vae_calls": split_calls(handle, "vae", names), "text_encoders": encoder_shares(handle, names)}


def ranks_identical(out: torch.Tensor) -> bool:
    """Whether every rank holds the same tensor as rank 0 (one all-gather: every rank must call it)."""
    gathered = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, out.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def image_report(out, again, reference, probe, reference_probe, **extra) -> dict:
    """What every end-to-end image test compares, on this rank: the image vs one process, a second call vs the
    first ("repeat_diff"; `again=None` where the worker makes no second call, and the field is left out), every
    rank's image vs rank 0's (one all-gather), the denoiser's SplitProbe summaries; `extra` fields (VAE calls,
    text-encoder shares, applied steps, detach problems) appended."""
    report = {
        "rank": dist.get_rank(),
        "split": probe.summary(),
        "split_reference": reference_probe.summary(),
        "diff": (out - reference).abs().max().item(),
        "scale": reference.abs().max().item(),
    }
    if again is not None:
        report["repeat_diff"] = (again - out).abs().max().item()
    report["ranks_identical"] = ranks_identical(out)
    report["shape"] = tuple(out.shape)
    return {**report, **extra}


def encoder_share(state: dict) -> dict:
    """What one rank holds of a tensor-parallel text encoder: its share of the parameter bytes and heads."""
    return {"bytes_ratio": state["param_bytes_after"] / max(state["param_bytes_before"], 1),
            "heads_per_rank": state.get("heads_per_rank")}


def encoder_shares(handle, names) -> dict:
    """encoder_share of every text encoder among the parallel module names, by name."""
    return {name: encoder_share(handle.state(name)) for name in names if name.startswith("text_encoder")}


def split_calls(handle, name: str, names) -> dict | None:
    """A copy of the split / whole call counts of the split module `name` (a VAE), or None where the run did not
    make it parallel (not among `names`, or left whole: no state). Copied: the counts as they stand now."""
    state = handle.state(name) if name in names else None
    return copy.deepcopy(state.calls) if state is not None else None
