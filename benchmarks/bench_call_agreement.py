"""What the per-call agreement costs: one exchange per pipeline call, against a denoising step.

    torchrun --nproc_per_node=2 benchmarks/bench_call_agreement.py [--size 64] [--steps 4] [--rounds 5]

Runs the demo's tiny FLUX pipeline (ulysses 2, VAE split) with `check_every_call=True` and `False`, interleaved
round by round, and times the agreement exchange alone (describe the call's arguments, fingerprint them, one
all-reduce of 3 integers), for a call with a text prompt and for one with precomputed prompt embeddings (their
checksums are part of the description). Prints each exchange's median time, the median time per denoising step,
and their ratio (target: under 1%), and where an exchange's time goes (describe / fingerprint / collective), with the
load average at the start and the end (the exchange's cost is mostly scheduling latency: report the load with it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--exchanges", type=int, default=200, help="agreement exchanges timed alone")
    args = parser.parse_args()
    torch.set_num_threads(1)

    import diffpar
    from diffpar.engines.call_agreement import describe_call
    from diffpar.mesh import ensure_process_group, fingerprint
    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    ensure_process_group()
    load_at_start = os.getloadavg()
    call = dict(prompt="a lighthouse on a cliff at dawn", height=args.size, width=args.size,
                num_inference_steps=args.steps, max_sequence_length=16, guidance_scale=3.5, output_type="pt")
    pipes = {}
    for check in (True, False):
        pipe = build_tiny_flux_pipeline()
        pipe.set_progress_bar_config(disable=True)
        diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
            ulysses_size=2, check_every_call=check, extra_parallel_modules=[pipe.vae]))
        pipes[check] = pipe

    times = {True: [], False: []}
    with torch.no_grad():
        for _ in range(args.rounds + 1):  # the first round warms up
            for check, pipe in pipes.items():
                dist.barrier()
                started = time.perf_counter()
                pipe(**call, generator=torch.Generator().manual_seed(0))
                times[check].append(time.perf_counter() - started)
    checker = pipes[True]._diffpar_handle.state("call_checker")
    pipe_call = type(pipes[True]).__call__
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipes[False].encode_prompt(call["prompt"], None, max_sequence_length=16)
    embeds_call = dict(call, prompt=None, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)
    samples = {"prompt": [], "embeds": [], "describe": [], "fingerprint": [], "collective": []}
    for _ in range(args.exchanges):
        for kind, kwargs in (("prompt", call), ("embeds", embeds_call)):
            dist.barrier()
            started = time.perf_counter()
            checker.agree(describe_call(pipe_call, (), dict(kwargs), skip_first=False))
            samples[kind].append(time.perf_counter() - started)
        # The parts of one exchange (embeddings call), each timed alone.
        dist.barrier()
        started = time.perf_counter()
        description = {"arguments": describe_call(pipe_call, (), dict(embeds_call), skip_first=False)}
        samples["describe"].append(time.perf_counter() - started)
        started = time.perf_counter()
        fingerprint(description)
        samples["fingerprint"].append(time.perf_counter() - started)
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(torch.zeros(3, dtype=torch.int64), op=dist.ReduceOp.MAX)
        samples["collective"].append(time.perf_counter() - started)

    with_check = statistics.median(times[True][1:])
    without = statistics.median(times[False][1:])
    per_step = without / args.steps
    one_exchange = statistics.median(samples["prompt"])
    embeds_exchange = statistics.median(samples["embeds"])
    if dist.get_rank() == 0:
        print(f"tiny FLUX pipeline {args.size}x{args.size}, {args.steps} steps, 2 ranks x 1 thread, "
              f"median of {args.rounds} rounds")
        print(f"  pipeline call, check_every_call=False : {without * 1e3:8.1f} ms ({per_step * 1e3:.1f} ms per step)")
        print(f"  pipeline call, check_every_call=True  : {with_check * 1e3:8.1f} ms")
        n = args.exchanges
        for label, value in (("prompt", one_exchange), ("prompt embeddings", embeds_exchange)):
            print(f"  one agreement exchange, {label:17s} (median of {n}): {value * 1e3:7.3f} ms "
                  f"= {100 * value / per_step:.2f}% of a denoising step, {100 * value / without:.2f}% of the call")
        parts = ", ".join(f"{k} {statistics.median(samples[k]) * 1e3:.3f} ms"
                          for k in ("describe", "fingerprint", "collective"))
        print(f"  where an exchange's time goes (medians, embeddings call): {parts}")
        loads = " -> ".join(f"{a:.2f} {b:.2f} {c:.2f}" for a, b, c in (load_at_start, os.getloadavg()))
        print(f"  load average (1, 5, 15 min), start -> end: {loads}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
