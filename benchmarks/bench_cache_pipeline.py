"""Caches on a whole pipeline: steps computed vs skipped and speed, with and without cache, 1 process vs 2 ranks.

    torchrun --nproc_per_node=2 benchmarks/bench_cache_pipeline.py [--size 256] [--steps 12] [--threshold 0.08]

The tiny FLUX pipeline (seeded random weights, local tokenizers), made heavier than the test one (8 heads x 64,
2 double + 4 single blocks), at 256 px = 4096 image tokens. Rank 0 first runs it alone without and with
DBCacheConfig (the other rank waits), then both ranks run it with Ulysses 2 without and with the same cache.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threshold", type=float, default=0.08)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    import diffpar
    from diffpar import DBCacheConfig, ParallelismConfig
    from diffpar.cache import cache_stats
    from diffpar.mesh import ensure_process_group
    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    torch.set_num_threads(1)
    assert ensure_process_group(), "run with torchrun --nproc_per_node=2"
    rank, world = dist.get_rank(), dist.get_world_size()

    def build():
        pipe = build_tiny_flux_pipeline(heads=8, head_dim=64, layers=2, single_layers=4)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(pipe):
        if getattr(pipe, "_diffpar_parallel", False):
            dist.barrier()
        t0 = time.perf_counter()
        with torch.no_grad():
            image = pipe("a lighthouse at dawn", height=args.size, width=args.size, num_inference_steps=args.steps,
                         guidance_scale=3.5, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                         output_type="pt").images
        return time.perf_counter() - t0, image

    cache = dict(residual_diff_threshold=args.threshold, Fn_compute_blocks=1, Bn_compute_blocks=1)
    rows = {}
    if rank == 0:
        plain = build()
        run(plain)  # warm-up
        rows["1 process, no cache"] = (*run(plain), None)
        cached = build()
        diffpar.enable_cache(cached, cache_config=DBCacheConfig(**cache))
        t, image = run(cached)
        rows["1 process, DBCache"] = (t, image, cache_stats(cached))
        reference = rows["1 process, no cache"][1]
        cached_reference = image
        del plain, cached
    dist.barrier()

    for label, cache_config in (("2 ranks Ulysses, no cache", None), ("2 ranks Ulysses, DBCache", DBCacheConfig(**cache))):
        pipe = build()
        diffpar.enable_cache(pipe, cache_config=cache_config, parallelism_config=ParallelismConfig(ulysses_size=world))
        pipe._diffpar_parallel = True
        if cache_config is None:
            run(pipe)  # warm-up
        t, image = run(pipe)
        slowest = torch.tensor([t], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        rows[label] = (slowest.item(), image, cache_stats(pipe) if cache_config is not None else None)

    if rank == 0:
        base = rows["1 process, no cache"][0]
        print(f"bench_cache_pipeline: tiny FLUX pipeline (8 heads x 64, 2+4 blocks), {args.size}px = "
              f"{(args.size // 4) ** 2} image tokens, {args.steps} steps, DBCache(Fn=1, Bn=1, "
              f"threshold={args.threshold}), 1 thread per process")
        for label, (t, image, stats) in rows.items():
            steps = f"computed {stats.computed:2d} / skipped {stats.skipped:2d}" if stats else f"computed {args.steps:2d} / skipped  0"
            ref = cached_reference if stats else reference
            print(f"  {label:28s} {t:7.3f} s  {steps}  speed vs 1 process no cache {base / t:5.2f}x  "
                  f"max|diff| vs same cache in 1 process {(image - ref).abs().max().item():.1e}")
        print(f"  cache speedup, 1 process: {base / rows['1 process, DBCache'][0]:.2f}x; 2 ranks: "
              f"{rows['2 ranks Ulysses, no cache'][0] / rows['2 ranks Ulysses, DBCache'][0]:.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
