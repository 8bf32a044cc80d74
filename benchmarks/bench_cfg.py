"""CFG parallelism: speed of cfg 2 on 2 ranks, and bytes on the wire of cfg 2 x ulysses 2 against ulysses 4.

    torchrun --nproc_per_node=2 benchmarks/bench_cfg.py            # speed: cfg 2 vs one process (1 thread each)
    torchrun --nproc_per_node=4 benchmarks/bench_cfg.py --bytes    # bytes per step: cfg2 x ulysses2 vs ulysses4

The pipeline is a FluxPipeline with true CFG (`true_cfg_scale` and a negative prompt: two transformer calls per
step), scaled from FLUX.1's proportions: width d = 512 (8 heads x 64), 2 double + 2 single blocks, 1024 image
tokens and 128 text tokens (FLUX.1: 4096 and 512), `output_type="latent"` so the VAE is left out.

Speed: rank 0 first runs the pipeline alone (the other rank waits), then both run it with cfg_size=2; wall
seconds, and each process's own CPU seconds (a proxy for dedicated cores on a shared, loaded machine; it leaves
out the time a rank waits at the exchange). The ideal
is 2x: the warm-up call learns the output template (group 1 also computes its first step's cond call), and every
timed call, with inputs of the same shapes and the pipeline's do_true_cfg on, splits from its first step. Bytes: every collective issued inside the transformer call (diffusers' Ulysses
all-to-alls and output gather, diffpar's cfg exchange) is counted as the bytes reaching this rank; a 4-rank time
on a 2-core machine would mean nothing, so none is printed.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist


def build(args):
    from diffpar.testing import tiny_pipelines

    pipe = tiny_pipelines.build_tiny_flux_pipeline(heads=8, head_dim=64, layers=2, single_layers=2)
    pipe.set_progress_bar_config(disable=True)
    side = int(round((args.image_tokens ** 0.5) * 4))  # tiny VAE (x2) and Flux packing (x2): tokens = (side/4)^2

    def call():
        with torch.no_grad():
            return pipe(prompt="a lighthouse at dawn", negative_prompt="blurry", true_cfg_scale=4.0,
                        guidance_scale=3.5, height=side, width=side, num_inference_steps=args.steps,
                        max_sequence_length=args.text_tokens, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images

    return pipe, call


class WireBytes:
    """Bytes reaching this rank through the collectives issued inside the transformer's calls."""

    def __init__(self, transformer):
        import torch.distributed._functional_collectives as funcol

        from diffpar.patch import Patch

        self.bytes, self.active = 0, False
        self.handles = [transformer.register_forward_pre_hook(lambda *a: setattr(self, "active", True)),
                        transformer.register_forward_hook(lambda *a: setattr(self, "active", False))]

        def size(group):
            if group is None:
                return dist.get_world_size()
            return group.size() if hasattr(group, "size") and not isinstance(group, dist.ProcessGroup) \
                else dist.get_world_size(group)

        def a2a(wrapped, instance, a, kw):
            if self.active:
                x, group = a[0], kw.get("group", a[3] if len(a) > 3 else None)
                p = size(group)
                self.bytes += x.numel() * x.element_size() * (p - 1) // p
            return wrapped(*a, **kw)

        def gather_tensor(wrapped, instance, a, kw):
            if self.active:
                x, group = a[0], kw.get("group", a[2] if len(a) > 2 else None)
                self.bytes += x.numel() * x.element_size() * (size(group) - 1)
            return wrapped(*a, **kw)

        def gather_list(wrapped, instance, a, kw):
            if self.active:
                x, group = a[1], kw.get("group", a[2] if len(a) > 2 else None)
                self.bytes += x.numel() * x.element_size() * (size(group) - 1)
            return wrapped(*a, **kw)

        self.patches = [Patch(funcol, "all_to_all_single", a2a), Patch(funcol, "all_gather_tensor", gather_tensor),
                        Patch(dist, "all_gather", gather_list)]

    def close(self):
        for p in reversed(self.patches):
            p.undo()
        for h in self.handles:
            h.remove()


def speed(args, rank, world):
    import diffpar

    pipe, call = build(args)
    single_s, single_cpu, reference = 0.0, 0.0, None
    if rank == 0:
        call()  # warm-up
        single_s = single_cpu = float("inf")
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            reference = call()
            single_s = min(single_s, time.perf_counter() - t0)
            single_cpu = min(single_cpu, time.process_time() - c0)
    dist.barrier()
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(cfg_size=world))
    out = call()  # warm-up: learns the output template
    counters = handle.state("cfg").counters["transformer"]
    best = best_cpu = float("inf")
    for _ in range(args.repeats):
        dist.barrier()
        computed = counters.computed
        t0, c0 = time.perf_counter(), time.process_time()
        out = call()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        computed = counters.computed - computed
    ref = reference if rank == 0 else torch.empty_like(out)
    dist.broadcast(ref, 0)
    stats = torch.tensor([best, (out - ref).abs().max().item(), best_cpu, computed], dtype=torch.float64)
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    handle.detach()
    if rank == 0:
        slowest = max(g[0].item() for g in gathered)
        print(f"bench_cfg speed: Flux-like true-CFG pipeline, d=512, 2+2 blocks, {args.image_tokens} image + "
              f"{args.text_tokens} text tokens, {args.steps} steps, fp32, 1 thread per process")
        print(f"  one process          : {single_s:.3f} s / call")
        print(f"  cfg 2 on 2 ranks     : {slowest:.3f} s / call (slowest rank)")
        print(f"  speed ratio          : {single_s / slowest:.2f}x (ideal 2x after the first call)")
        busiest = max(g[2].item() for g in gathered)
        print(f"  CPU seconds (this process's own, insensitive to other load): one process {single_cpu:.3f}, "
              f"busiest rank {busiest:.3f}, ratio {single_cpu / busiest:.2f}x")
        print(f"  max abs diff vs one process: {max(g[1].item() for g in gathered):.2e}")
        print(f"  denoiser forwards per timed call, by rank: {[int(g[3].item()) for g in gathered]} "
              f"(one process: {2 * args.steps})")


def wire_bytes(args, rank, world):
    import diffpar

    per_step = {}
    for label, config in (("cfg 2 x ulysses 2", dict(cfg_size=2, ulysses_size=world // 2)),
                          (f"ulysses {world}", dict(ulysses_size=world))):
        pipe, call = build(args)
        handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(**config))
        call()  # first call: group 1 also computes step 0's cond; count a steady call
        counter = WireBytes(pipe.transformer)
        call()
        counter.close()
        handle.detach()
        total = torch.tensor([float(counter.bytes)], dtype=torch.float64)
        dist.all_reduce(total)
        per_step[label] = total.item() / world / args.steps  # mean over ranks
    if rank == 0:
        (a, va), (b, vb) = per_step.items()
        print(f"bench_cfg bytes: same pipeline, {world} ranks, bytes reaching each rank per denoising step (mean)")
        print(f"  {a:18s}: {va / 2**20:.2f} MiB / step")
        print(f"  {b:18s}: {vb / 2**20:.2f} MiB / step")
        print(f"  ratio ({b} / {a}): {vb / va:.2f}x")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bytes", action="store_true", help="count bytes (4 ranks) instead of timing (2 ranks)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--image-tokens", type=int, default=1024)
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("diffpar").setLevel(logging.ERROR)
    from diffpar.mesh import ensure_process_group

    torch.set_num_threads(1)
    assert ensure_process_group(), "run with torchrun --nproc_per_node=2 (or 4 with --bytes)"
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.bytes:
        wire_bytes(args, rank, world)
    else:
        speed(args, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
