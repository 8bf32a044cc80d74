"""Compiled vs eager parallel transformer steps: time per step and compile time, per rank (docs/compile.md).

    torchrun --nproc_per_node=2 benchmarks/bench_compile.py [--kind ulysses|ring|tp] [--mode regional|whole]
                                                             [--backend inductor] [--layers 2] [--seq 1024]

A Flux-shaped transformer (`tiny_transformers.build("flux")` widened: 8 heads x 64, `--layers` double and single
blocks), `enable_cache` with the chosen parallelism, then: eager steps, the compile (first call), compiled steps.
Rank 0 prints one JSON line: eager and compiled seconds per step (median of `--steps`), first-call seconds, graphs
compiled, max abs difference compiled vs eager.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=("ulysses", "ring", "tp"), default="ulysses")
    parser.add_argument("--mode", choices=("regional", "whole"), default="regional")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import diffpar
    from diffpar.testing import tiny_transformers

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    model, make_inputs = tiny_transformers.build("flux", heads=8, head_dim=64, layers=args.layers,
                                                 single_layers=args.layers)
    inputs = make_inputs(seq=args.seq, text=128)
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**{f"{args.kind}_size": world}))

    graphs = []

    def counting_backend(gm, example_inputs):
        from torch._dynamo import lookup_backend

        graphs.append(gm)
        return lookup_backend(args.backend)(gm, example_inputs)

    def timed(fn):
        dist.barrier()
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    with torch.no_grad():
        eager_times, eager_out = [], None
        for _ in range(args.steps):
            t, eager_out = timed(lambda: model(**inputs)[0])
            eager_times.append(t)
        if args.mode == "regional":
            model.compile_repeated_blocks(fullgraph=True, backend=counting_backend)
            compiled = model
        else:
            compiled = torch.compile(model, backend=counting_backend)
        first, compiled_out = timed(lambda: compiled(**inputs)[0])
        compiled_times = [timed(lambda: compiled(**inputs)[0])[0] for _ in range(args.steps)]
    result = {
        "world": world, "kind": args.kind, "mode": args.mode, "backend": args.backend, "seq": args.seq,
        "layers": args.layers, "eager_step_s": statistics.median(eager_times),
        "compiled_step_s": statistics.median(compiled_times), "first_compiled_call_s": first, "graphs": len(graphs),
        "max_abs_diff": (compiled_out - eager_out).abs().max().item(),
    }
    if dist.get_rank() == 0:
        print(json.dumps(result))
    handle.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
