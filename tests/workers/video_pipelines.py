"""Rank-side whole video pipelines (tests/test_video_pipelines.py): one process vs `enable_cache(pipe, ...)` with the
transformer context parallel, the named text encoders tensor parallel and the VAE split, on this world."""
from __future__ import annotations

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_video_pipelines
from diffpar.testing.probes import SplitProbe
from workers.reports import encoder_shares, split_calls, video_report


def _call(pipe, kind: str, seed: int, steps: int, overrides: dict):
    kwargs = tiny_video_pipelines.call_arguments(kind)
    kwargs.update(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    kwargs.update(overrides)
    return pipe(**kwargs).frames


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
        vae_calls = split_calls(handle, "vae", extra)
        encoders = encoder_shares(handle, extra)
    finally:
        problems = handle.detach(strict=False)  # never leave shims installed for the next test
    return video_report(out, reference, probe, reference_probe, steps=handle.step_names, vae_calls=vae_calls,
                        text_encoders=encoders, detach_problems=problems)
