"""Rank-side end-to-end pipeline runs: one process vs `enable_cache(pipe, ...)` on this world."""
from __future__ import annotations

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_pipelines
from diffpar.testing.probes import SplitProbe
from workers.end_to_end import image_report

PROMPT = "a red fox in snow"


def _call(pipe, kind: str, seed: int, steps: int, **overrides):
    kwargs = dict(prompt=PROMPT, height=32, width=32, num_inference_steps=steps, max_sequence_length=16,
                  generator=torch.Generator().manual_seed(seed), output_type="pt")
    kwargs.update(overrides)
    if kind == "wan":
        kwargs.update(num_frames=5, guidance_scale=1.0)
        return pipe(**kwargs).frames
    kwargs.update(guidance_scale=3.5)
    return pipe(**kwargs).images


def _build(kind: str, builder_kwargs: dict):
    build = {"flux": tiny_pipelines.build_tiny_flux_pipeline, "wan": tiny_pipelines.build_tiny_wan_pipeline}[kind]
    pipe = build(**builder_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_equivalence(kind: str, config: dict, extra: list[str] = (), steps: int = 2,
                         builder_kwargs: dict | None = None, rank_seeds: bool = True, detach: bool = True,
                         call_kwargs: dict | None = None):
    """Rank r passes generator seed r (when rank_seeds): the broadcast makes every rank use rank 0's noise.

    "split" / "split_reference": what the transformer's first attention saw and the collectives issued during
    the first parallel call and the one-process call (SplitProbe summaries). `call_kwargs`: pipeline arguments
    replacing the defaults (sizes, max_sequence_length)."""
    builder_kwargs = builder_kwargs or {}
    call_kwargs = call_kwargs or {}
    reference_pipe = _build(kind, builder_kwargs)
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = _call(reference_pipe, kind, seed=0, steps=steps, **call_kwargs)
    del reference_pipe
    pipe = _build(kind, builder_kwargs)
    cfg = dict(config)
    cfg["extra_parallel_modules"] = [getattr(pipe, name) for name in extra]
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(**cfg))
    seed = dist.get_rank() if rank_seeds else 0
    try:
        with torch.no_grad():
            with SplitProbe(pipe.transformer) as probe:
                out = _call(pipe, kind, seed=seed, steps=steps, **call_kwargs)
            again = _call(pipe, kind, seed=seed, steps=steps, **call_kwargs)
    except BaseException:
        handle.detach(strict=False)  # a refused call must not leave the shims installed for the next test
        raise
    result = image_report(out, again, reference, probe, reference_probe, steps=handle.step_names)
    if detach:
        problems = handle.detach(strict=False)
        result["detach_problems"] = problems
        if not problems:  # sharded encoders refuse to run after detach (tested in test_text_encoders)
            with torch.no_grad():
                after = _call(pipe, kind, seed=0, steps=steps, **call_kwargs)
            result["detach_diff"] = (after - reference).abs().max().item()
    return result
