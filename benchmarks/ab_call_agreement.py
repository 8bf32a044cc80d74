"""The per-call agreement's cost, this code against an earlier version of it, in one process, calls taking turns.

    git show e7933e1:src/diffpar/engines/call_agreement.py > /tmp/old_call_agreement.py
    torchrun --nproc_per_node=2 benchmarks/ab_call_agreement.py /tmp/old_call_agreement.py [--calls 40]

Separate launches of bench_call_agreement.py differ by 5-10% in the agreement's cost alone (memory layout, load),
more than most changes to it. Here both versions run in the same processes on the same pipeline: the earlier
file is loaded as a module of its own, and its `CallChecker.begin` and `_run_agreed` (the call's start, the
exchange issued, its settle) take turns with the current ones call by call. Everything else (the random streams,
the exchange's buffers, the settle points) is the current code in both. Prints the calling thread's time in the
agreement (`CallChecker.last_seconds`), median per case, as a % of a denoising step (the demo's tiny FLUX, 64x64,
4 steps, Ulysses 2 + VAE split: a step is the whole call's median over 4).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("earlier", help="an earlier src/diffpar/engines/call_agreement.py (git show REV:PATH > FILE)")
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import diffpar
    from diffpar.engines import call_agreement as current
    from diffpar.mesh import ensure_process_group
    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    spec = importlib.util.spec_from_file_location("earlier_call_agreement", args.earlier)
    earlier = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(earlier)
    ensure_process_group()
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
        ulysses_size=2, extra_parallel_modules=[pipe.vae]))
    checker = handle.state("call_checker")
    versions = {"current": (current._run_agreed, current.CallChecker.begin),
                "earlier": (earlier._run_agreed, earlier.CallChecker.begin)}
    call = dict(prompt="a lighthouse on a cliff at dawn", height=64, width=64, num_inference_steps=4,
                max_sequence_length=16, guidance_scale=3.5, output_type="pt")
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(call["prompt"], None, max_sequence_length=16)
    embeds_call = dict(call, prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    cost: dict[tuple, list[float]] = {}
    whole = []
    load_at_start = os.getloadavg()
    with torch.no_grad():
        for i in range(args.calls + 1):  # the first round warms up
            for version, (run_agreed, begin) in versions.items():
                current._run_agreed, current.CallChecker.begin = run_agreed, begin
                for label, kwargs in (("prompt", call), ("prompt embeddings", embeds_call)):
                    for seeds in ("same seed", "seed per rank"):
                        dist.barrier()
                        seed = 0 if seeds == "same seed" else dist.get_rank()
                        started = time.perf_counter()
                        pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
                        elapsed = time.perf_counter() - started
                        if i:
                            cost.setdefault((label, seeds, version), []).append(checker.last_seconds)
                            if (label, seeds) == ("prompt", "same seed"):
                                whole.append(elapsed)
    current._run_agreed, current.CallChecker.begin = versions["current"]
    if dist.get_rank() == 0:
        step = statistics.median(whole) / 4
        print(f"tiny FLUX 64x64, 4 steps, Ulysses 2 + VAE split, 2 ranks: {step * 1e3:.2f} ms per step; the calling "
              f"thread's time in the agreement, median of {args.calls} calls per case:")
        for label in ("prompt", "prompt embeddings"):
            for seeds in ("same seed", "seed per rank"):
                shown = []
                for version in versions:
                    median = statistics.median(cost[(label, seeds, version)])
                    shown.append(f"{version} {median * 1e3:.3f} ms = {100 * median / step:.2f}%")
                print(f"  {label:17s} {seeds:13s}: {'; '.join(shown)}")
        print(f"  load average (1, 5, 15 min), start -> end: {load_at_start} -> {os.getloadavg()}")
    handle.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
