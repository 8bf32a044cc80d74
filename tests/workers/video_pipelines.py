"""Rank-side whole video pipelines (tests/test_video_pipelines.py): one process vs `enable_cache(pipe, ...)` with the
transformer context parallel, the named text encoders tensor parallel and the VAE split, on this world."""
from __future__ import annotations

import torch
import torch.distributed as dist

from diffpar.testing import tiny_video_pipelines
from workers.end_to_end import against_one_process


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
    runs = against_one_process(lambda: tiny_video_pipelines.build(kind),
                               lambda pipe, seed: _call(pipe, kind, seed, steps, overrides), config, extra,
                               seed=dist.get_rank() if rank_seeds else 0)
    return runs.video_report()
