"""Rank-side end-to-end runs of image-conditioned pipelines: one process vs `enable_cache(pipe, ...)` with the
transformer context parallel, its text encoders tensor parallel and the VAE split (decode and encode)."""
from __future__ import annotations

import torch.distributed as dist

from diffpar.testing import tiny_image_pipelines
from workers.end_to_end import LatestBuild, against_one_process


def _images(out):
    return out[0] if isinstance(out, tuple) else out.images


def pipeline_equivalence(kind: str, config: dict, steps: int = 2, rank_seeds: bool = True,
                         extra: list[str] | None = None, vae_split_min_rows: int = 0):
    """The pipeline in one process, then the same (freshly built) pipeline on every rank with every module of
    PARALLEL_MODULES[kind] parallel. Rank r passes generator seed r (when rank_seeds): diffpar's broadcasts must
    make every rank use rank 0's noise.

    Returns the image difference, whether ranks agree, the transformer's SplitProbe summaries ("split" and
    "split_reference") and the VAE's split/whole call counts for decode and encode ("vae_calls")."""
    names = list(tiny_image_pipelines.PARALLEL_MODULES[kind] if extra is None else extra)
    latest = LatestBuild(lambda: tiny_image_pipelines.build(kind))

    def run(pipe, seed):
        return _images(pipe(**latest.make_call(steps=steps, seed=seed)))

    runs = against_one_process(latest.build, run, dict(config, vae_split_min_rows=vae_split_min_rows), names,
                               seed=dist.get_rank() if rank_seeds else 0, repeat=True)
    return runs.image_report()
