"""Where the per-call agreement's time goes, inside real pipeline calls (bench_call_agreement.py gives the total).

    torchrun --nproc_per_node=2 benchmarks/profile_call_agreement.py [--calls 40]

Runs the demo's tiny FLUX pipeline (64x64, 4 steps, Ulysses 2 + VAE split) with a timing wrapper around each part
of the agreement (reading the random states, binding the arguments to their names, their fingerprint, issuing the
exchange, settling it), and times the fingerprint twice more right after the first time, in the same call: the
first touch after the previous call's decode finds the caches cold, which is most of what each part costs there
(the same parts take 5-10x less in a tight loop). Medians over calls; each wrapper adds a little.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    import diffpar
    from diffpar import mesh as mesh_lib
    from diffpar.engines import call_agreement
    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    mesh_lib.ensure_process_group()
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
        ulysses_size=2, extra_parallel_modules=[pipe.vae]))
    checker = handle.state("call_checker")
    current: dict[str, float] = {}

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                current[name] = current.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    fingerprint = call_agreement.arguments_fingerprint

    def fingerprinted_three_times(*a, **k):
        for label in ("fingerprint, first", "fingerprint, again", "fingerprint, third"):
            started = time.perf_counter()
            out = fingerprint(*a, **k)
            current[label] = time.perf_counter() - started
        return out

    checker.random_streams = timed("random states", checker.random_streams)
    call_agreement.call_items = timed("bind the arguments", call_agreement.call_items)
    call_agreement.arguments_fingerprint = fingerprinted_three_times
    mesh_lib.agree_start = timed("issue the exchange", mesh_lib.agree_start)
    mesh_lib.PendingAgreement.settle = timed("settle", mesh_lib.PendingAgreement.settle)
    call = dict(prompt="a lighthouse on a cliff at dawn", height=64, width=64, num_inference_steps=4,
                max_sequence_length=16, guidance_scale=3.5, output_type="pt")
    parts: dict[str, list[float]] = {}
    whole = []
    with torch.no_grad():
        for i in range(args.calls + 1):  # the first call warms up
            dist.barrier()
            current.clear()
            started = time.perf_counter()
            pipe(**call, generator=torch.Generator().manual_seed(0))
            whole.append(time.perf_counter() - started)
            current["the agreement, all of it (the checker's own timing)"] = checker.last_seconds
            if i:
                for name, seconds in current.items():
                    parts.setdefault(name, []).append(seconds)
    if dist.get_rank() == 0:
        step = statistics.median(whole[1:]) / 4
        print(f"tiny FLUX 64x64, 4 steps, Ulysses 2 + VAE split: {step * 1e3:.2f} ms per step; median per call:")
        for name, values in parts.items():
            median = statistics.median(values)
            print(f"  {name:52s} {median * 1e6:7.1f} us ({100 * median / step:.2f}% of a step)")
        print("  (the first fingerprint is part of the agreement; the two after it are extra, to show the cold start)")
        print(f"  load average: {os.getloadavg()}")
    handle.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
