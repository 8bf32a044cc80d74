"""The cost of diffusers' uneven-split path (what a call whose lengths do not divide switches to by itself) against
an even split, on the same tiny FLUX-shaped transformer.

    torchrun --nproc_per_node=2 benchmarks/bench_uneven.py [--seq 1024] [--text 256] [--layout ulysses|ring]

Three timings per rank (median of --repeats forwards, after one warm-up): "even" (default config, lengths that
divide), "uneven path, even lengths" (the same input with ulysses_anything / ring_anything set: the path's own
overhead, the size exchanges it adds), "uneven lengths" (one image and one text token fewer: what an odd prompt
or image size costs by default).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def _median_forward(model, inputs, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(**inputs)
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024, help="image tokens (even case)")
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--layout", choices=["ulysses", "ring"], default="ulysses")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    import diffpar
    from diffpar.mesh import ensure_process_group
    from diffpar.testing import tiny_transformers

    ensure_process_group()
    torch.set_num_threads(1)
    world = dist.get_world_size()
    degree = {"ulysses_size": world} if args.layout == "ulysses" else {"ring_size": world}
    anything = {"ulysses_anything": True} if args.layout == "ulysses" else {"ring_anything": True}
    model, make_inputs = tiny_transformers.build("flux", heads=args.heads, head_dim=args.head_dim,
                                                 layers=args.layers, single_layers=args.layers)
    even = make_inputs(seq=args.seq, text=args.text)
    odd = make_inputs(seq=args.seq - 1, text=args.text - 1)

    results = {}
    for label, config, inputs in (("even", degree, even), ("uneven path, even lengths", {**degree, **anything}, even),
                                  ("uneven lengths (default config)", degree, odd)):
        handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
        try:
            results[label] = _median_forward(model, inputs, args.repeats)
        finally:
            handle.detach()
    if dist.get_rank() == 0:
        base = results["even"]
        print(f"{args.layout} x {world}, {args.seq}+{args.text} tokens, {args.heads}x{args.head_dim}, "
              f"{args.layers}+{args.layers} blocks, 1 thread per rank")
        for label, seconds in results.items():
            print(f"  {label:34s} {seconds * 1e3:8.2f} ms  ({(seconds / base - 1) * 100:+.1f}% vs even)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
