"""Rank-side whole video pipelines (tests/test_video_pipelines.py): one process vs `enable_cache(pipe, ...)` with the
transformer context parallel, the named text encoders tensor parallel and the VAE split, on this world."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_video_pipelines
from diffpar.testing.probes import SplitProbe


def _call(pipe, kind: str, seed: int, steps: int, overrides: dict):
    kwargs = tiny_video_pipelines.call_arguments(kind)
    kwargs.update(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    kwargs.update(overrides)
    return pipe(**kwargs).frames


def _encoder_share(state: dict) -> dict:
    """What one rank holds of a tensor-parallel text encoder: its share of the parameter bytes and heads."""
    return {"bytes_ratio": state["param_bytes_after"] / max(state["param_bytes_before"], 1),
            "heads_per_rank": state.get("heads_per_rank")}


def video_equivalence(kind: str, config: dict, extra: list[str] = (), steps: int = 2, rank_seeds: bool = True,
                      call_kwargs: dict | None = None):
    """The video of a parallel run vs one process, with SplitProbe summaries of the transformer ("split",
    "split_reference") and what the VAE split did ("vae_calls": split / whole encodes and decodes) and its text
    encoders' state. Rank r passes generator seed r (when rank_seeds): diffpar's latent broadcast must make every
    rank use rank 0's noise."""
    overrides = dict(call_kwargs or {})
    reference_pipe = tiny_video_pipelines.build(kind)
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = _call(reference_pipe, kind, 0, steps, overrides)
    del reference_pipe
    pipe = tiny_video_pipelines.build(kind)
    cfg = dict(config)
    cfg["extra_parallel_modules"] = [getattr(pipe, name) for name in extra]
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(**cfg))
    seed = dist.get_rank() if rank_seeds else 0
    try:
        with torch.no_grad(), SplitProbe(pipe.transformer) as probe:
            out = _call(pipe, kind, seed, steps, overrides)
        vae_state = handle.state("vae") if "vae" in extra else None
        vae_calls = copy.deepcopy(vae_state.calls) if vae_state is not None else None
        encoders = {name: _encoder_share(handle.state(name)) for name in extra if name.startswith("text_encoder")}
    finally:
        problems = handle.detach(strict=False)  # never leave shims installed for the next test
    gathered = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, out.contiguous())
    return {
        "rank": dist.get_rank(),
        "split": probe.summary(),
        "split_reference": reference_probe.summary(),
        "diff": (out - reference).abs().max().item(),
        "scale": reference.abs().max().item(),
        "ranks_identical": all(torch.equal(g, gathered[0]) for g in gathered),
        "shape": tuple(out.shape),
        "steps": handle.step_names,
        "vae_calls": vae_calls,
        "text_encoders": encoders,
        "detach_problems": problems,
    }
