"""What the end-to-end pipeline workers report, on this rank: one image or video against the same pipeline in one
process, ranks against each other, and what each parallel extra module held or did. One copy here serves every
image and video worker, so the tests read the same fields under the same names everywhere."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist


def ranks_identical(out: torch.Tensor) -> bool:
    """Whether every rank holds the same tensor as rank 0 (one all-gather: every rank must call it)."""
    gathered = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, out.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def image_report(out, again, reference, probe, reference_probe, **extra) -> dict:
    """What every end-to-end image test compares, on this rank: the image vs one process, a second call vs the
    first ("repeat_diff"; `again=None` where the worker makes no second call, and the field is left out), every
    rank's image vs rank 0's (one all-gather), the transformer's SplitProbe summaries; `extra` fields (VAE calls,
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


def video_report(frames, reference, probe, reference_probe, audio=None, reference_audio=None, **extra) -> dict:
    """image_report for a video (one call, no repeat) and, where the pipeline also generates sound (LTX-2), the
    waveform vs one process ("audio_diff", None without audio)."""
    audio_diff = None if audio is None else (audio - reference_audio).abs().max().item()
    return image_report(frames, None, reference, probe, reference_probe, audio_diff=audio_diff, **extra)


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
