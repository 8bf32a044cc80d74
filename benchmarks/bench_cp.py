"""Transformer context parallelism: speed and bytes on the wire, N ranks x 1 thread vs 1 process x 1 thread.

    torchrun --nproc_per_node=2 benchmarks/bench_cp.py [--seq 4096] [--layout ulysses|ring|both]

Rank 0 first times the model alone (the other ranks wait), then every rank runs it context-parallel. Bytes are
counted at diffusers' collectives inside attention (all-to-all for Ulysses, all-gather for Ring) and compared
with the minimum for Ulysses, 4*N*d*b/P per layer and rank (q, k, v and the output each cross once), and for
Ring, 2*N*d*b*(P-1)/P (every other rank's K and V reach each rank once).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096, help="image tokens")
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--layout", choices=["ulysses", "ring", "both"], default="ulysses")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed._functional_collectives as funcol
    from diffusers.models import attention_dispatch as ad

    import diffpar
    from diffpar.patch import Patch
    from diffpar.mesh import ensure_process_group
    from diffpar.testing import tiny_transformers

    torch.set_num_threads(1)
    assert ensure_process_group(), "run with torchrun --nproc_per_node=2"
    rank, world = dist.get_rank(), dist.get_world_size()
    model, make_inputs = tiny_transformers.build(
        "flux", heads=args.heads, head_dim=args.head_dim, layers=args.layers, single_layers=args.layers)
    inputs = make_inputs(seq=args.seq, text=args.text)
    n_tokens = args.seq + args.text
    width = args.heads * args.head_dim
    n_attn = 2 * args.layers

    def timed(m):
        with torch.no_grad():
            m(**copy.deepcopy(inputs))  # warm-up
            best = float("inf")
            for _ in range(args.repeats):
                dist.barrier()
                t0 = time.perf_counter()
                out = m(**copy.deepcopy(inputs))[0]
                best = min(best, time.perf_counter() - t0)
        return best, out

    single_s, reference = 0.0, None
    if rank == 0:
        with torch.no_grad():
            m = copy.deepcopy(model)
            m(**copy.deepcopy(inputs))
            single_s = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                reference = m(**copy.deepcopy(inputs))[0]
                single_s = min(single_s, time.perf_counter() - t0)
            del m
    dist.barrier()

    cfg = {"ulysses": dict(ulysses_size=world), "ring": dict(ring_size=world),
           "both": dict(ulysses_size=2, ring_size=world // 2)}[args.layout]
    diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**cfg))

    sent = {"bytes": 0, "calls": 0}

    def count_a2a(wrapped, instance, a, kw):
        x = a[0]
        group_size = dist.get_world_size(a[-1] if len(a) > 1 else kw.get("group"))
        sent["bytes"] += x.numel() * x.element_size() * (group_size - 1) // group_size
        sent["calls"] += 1
        return wrapped(*a, **kw)

    def count_gather(wrapped, instance, a, kw):
        x = a[0]
        group = kw.get("group", a[2] if len(a) > 2 else None)
        group_size = dist.get_world_size(group) if not hasattr(group, "size") else group.size()
        sent["bytes"] += x.numel() * x.element_size() * (group_size - 1)  # what reaches this rank
        sent["calls"] += 1
        return wrapped(*a, **kw)

    patches = [Patch(ad, "_all_to_all_single", count_a2a)]
    if hasattr(funcol, "all_gather_tensor"):
        patches.append(Patch(funcol, "all_gather_tensor", count_gather))
    with torch.no_grad():
        model(**copy.deepcopy(inputs))
    per_forward = sent["bytes"]
    for p in patches:
        p.undo()

    parallel_s, out = timed(model)
    ref = reference if rank == 0 else torch.empty_like(out)
    dist.broadcast(ref, 0)
    diff = (out - ref).abs().max().item()
    b = 4  # fp32
    if args.layout == "ulysses":
        minimum = 4 * n_tokens * width * b / world * (world - 1) / world
        formula = "4*N*d*b/P*(P-1)/P"
    elif args.layout == "ring":
        minimum = 2 * n_tokens * width * b * (world - 1) / world
        formula = "2*N*d*b*(P-1)/P"
    else:
        minimum = float("nan")
        formula = "n/a"
    stats = torch.tensor([parallel_s, diff, per_forward / n_attn], dtype=torch.float64)
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    if rank == 0:
        slowest = max(g[0].item() for g in gathered)
        per_layer = max(g[2].item() for g in gathered)
        print(f"bench_cp: Flux-like, {n_tokens} tokens (N), d={width}, {n_attn} attention layers, fp32, "
              f"{world} ranks x 1 thread, layout={args.layout} {cfg}")
        print(f"  one process x 1 thread : {single_s:.3f} s / forward")
        print(f"  {world} ranks x 1 thread    : {slowest:.3f} s / forward (slowest rank)")
        print(f"  speed ratio            : {single_s / slowest:.2f}x")
        print(f"  bytes sent per attention layer and rank: {per_layer / 2**20:.2f} MiB; minimum {formula} = "
              f"{minimum / 2**20:.2f} MiB; ratio {per_layer / minimum:.2f}")
        print(f"  max abs diff vs one process: {max(g[1].item() for g in gathered):.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
