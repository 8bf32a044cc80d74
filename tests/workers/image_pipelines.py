"""Rank-side end-to-end runs of image-conditioned pipelines: one process vs `enable_cache(pipe, ...)` with the
transformer context parallel, its text encoders tensor parallel and the VAE split (decode and encode)."""
from __future__ import annotations

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_image_pipelines
from diffpar.testing.probes import SplitProbe
from workers.reports import image_report, split_calls


def _images(out):
    return out[0] if isinstance(out, tuple) else out.images


def pipeline_equivalence(kind: str, config: dict, steps: int = 2, rank_seeds: bool = True,
                         extra: list[str] | None = None, vae_split_min_rows: int = 0):
    """The pipeline in one process, then the same (freshly built) pipeline on every rank with every module of
    PARALLEL_MODULES[kind] parallel. Rank r passes generator seed r (when rank_seeds): diffpar's broadcasts must
    make every rank use rank 0's noise.

    Returns the image difference, whether ranks agree, the transformer's SplitProbe summaries ("split" and
    "split_reference") and the VAE's split/whole call counts for decode and encode ("vae_calls")."""
    reference_pipe, make_call = tiny_image_pipelines.build(kind)
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = _images(reference_pipe(**make_call(steps=steps, seed=0)))
    del reference_pipe
    pipe, make_call = tiny_image_pipelines.build(kind)
    names = list(tiny_image_pipelines.PARALLEL_MODULES[kind] if extra is None else extra)
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
        **config, extra_parallel_modules=[getattr(pipe, name) for name in names],
        vae_split_min_rows=vae_split_min_rows))
    seed = dist.get_rank() if rank_seeds else 0
    try:
        with torch.no_grad():
            with SplitProbe(pipe.transformer) as probe:
                out = _images(pipe(**make_call(steps=steps, seed=seed)))
            again = _images(pipe(**make_call(steps=steps, seed=seed)))
        vae_calls = split_calls(handle, "vae", names)
    finally:
        problems = handle.detach(strict=False)  # also on error: no shim may outlive the test
    return image_report(out, again, reference, probe, reference_probe,
                        vae_calls=vae_calls, steps=handle.step_names, detach_problems=problems)
