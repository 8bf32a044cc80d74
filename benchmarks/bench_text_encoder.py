"""Text-encoder tensor parallelism: memory per rank, communication per layer, encode time (2 ranks vs 1).

    torchrun --nproc_per_node=2 benchmarks/bench_text_encoder.py

Every figure comes from this one run, each process on one thread (gloo on CPU):
1. parameter bytes per rank vs the unsharded encoder, on T5-XXL proportions scaled down by 8 in width and
   vocabulary (d_model 512, 8 heads of 64, d_ff 1280, 24 layers, vocab 4016: the same embedding/layer ratio
   as T5-XXL's 4096 / 64x64 / 10240 / 24 / 32128), and on a Qwen2.5-VL-7B-shaped decoder (28 query / 4 KV
   heads) scaled down;
2. all-reduces per layer, counted by wrapping torch.distributed.all_reduce during one forward;
3. encode time on a compute-heavy shape: the unsharded encoder on rank 0 alone (the other rank waits at a
   barrier) vs the sharded encoder on both ranks, interleaved round by round so both see the same background
   load; medians after a warm-up round.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.distributed as dist

from diffpar.families.text_encoders.base import TEXT_ENCODER_ADAPTER, build_plan, parameter_bytes
from diffpar.handle import ParallelHandle
from diffpar.mesh import ensure_process_group
from diffpar.testing import tiny_text_encoders


def shard(model):
    """What enable_cache does for one extra module: plan (local checks), apply over the world, commit."""
    handle = ParallelHandle(target=model)
    plan = TEXT_ENCODER_ADAPTER.plan(model, "text_encoder", dist.get_world_size(), None)
    handle.states["text_encoder"] = TEXT_ENCODER_ADAPTER.apply(model, plan, dist.group.WORLD, handle, None, None)
    handle.commit()
    return handle


def bytes_ratio(name: str, **shape) -> tuple[int, list[int], list[int]]:
    """Unsharded bytes, every rank's bytes measured after sharding, and every rank's bytes from the plan alone."""
    model, _ = tiny_text_encoders.build(name, **shape)
    full = parameter_bytes(model)
    predicted = build_plan(model, dist.get_world_size()).weight_bytes(model)["per_rank_all"]
    shard(model)
    mine = torch.tensor([parameter_bytes(model)], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return full, [int(t.item()) for t in every], predicted


def all_reduces_per_layer(name: str, layers: int, seq: int = 16, **shape) -> float:
    model, make_inputs = tiny_text_encoders.build(name, layers=layers, **shape)
    shard(model)
    inputs = make_inputs(batch=1, seq=seq, pad=False)
    count = 0
    original = dist.all_reduce

    def counting(*args, **kwargs):
        nonlocal count
        count += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        dist.all_reduce = original
    return count / layers


def encode_time(name: str, seq: int, repeats: int, **shape) -> dict:
    """Interleaved: each repeat times the unsharded encoder on rank 0 alone (the other rank waits at a barrier),
    then the sharded encoder on every rank, so both see the same background load."""
    rank = dist.get_rank()
    model, make_inputs = tiny_text_encoders.build(name, **shape)
    inputs = make_inputs(batch=1, seq=seq, pad=False)
    full = copy.deepcopy(model) if rank == 0 else None
    shard(model)

    def run(m):
        with torch.no_grad():
            return m(**inputs).last_hidden_state

    one_process, sharded = [], []
    for i in range(repeats + 1):  # the first round warms up
        dist.barrier()
        if rank == 0:
            start = time.perf_counter()
            run(full)
            elapsed = time.perf_counter() - start
            if i:
                one_process.append(elapsed)
        dist.barrier()
        start = time.perf_counter()
        run(model)
        elapsed = time.perf_counter() - start
        if i:
            sharded.append(elapsed)
    # Time inside the all-reduces of one more sharded forward (waiting for the slower rank included).
    in_all_reduce = 0.0
    original = dist.all_reduce

    def timed_all_reduce(*args, **kwargs):
        nonlocal in_all_reduce
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            in_all_reduce += time.perf_counter() - start

    dist.barrier()
    dist.all_reduce = timed_all_reduce
    try:
        out = run(model)
    finally:
        dist.all_reduce = original
    result = {"two_ranks_s": statistics.median(sharded), "two_ranks_all": sharded, "all_reduce_s": in_all_reduce}
    if rank == 0:
        reference = run(full)
        result.update(one_process_s=statistics.median(one_process), one_process_all=one_process,
                      max_abs_diff=(out - reference).abs().max().item(), max_abs_output=reference.abs().max().item())
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not ensure_process_group():
        raise SystemExit("launch with: torchrun --nproc_per_node=2 benchmarks/bench_text_encoder.py")
    world, rank = dist.get_world_size(), dist.get_rank()

    t5xxl_scaled = dict(heads=8, d_kv=64, d_model=512, d_ff=1280, layers=24, vocab=4016)
    full, per_rank, predicted = bytes_ratio("t5-gated", **t5xxl_scaled)
    qwen_scaled = dict(heads=28, kv_heads=4, hidden=896, intermediate=4736, layers=4)
    q_full, q_per_rank, q_predicted = bytes_ratio("qwen2_5_vl", **qwen_scaled)
    reduces = {n: all_reduces_per_layer(n, layers=3) for n in ("t5-gated", "umt5", "clip", "llama", "glm")}
    heavy = dict(heads=16, d_kv=64, d_model=1024, d_ff=2816, layers=4)
    timing = encode_time("t5-gated", seq=args.seq, repeats=args.repeats, **heavy)

    if rank == 0:
        print(f"world={world}, 1 thread per process, torch {torch.__version__}")
        print("\n== parameter bytes per rank vs unsharded ==")
        print(f"T5-XXL proportions / 8 ({t5xxl_scaled}): unsharded {full / 2**20:.1f} MiB; per rank "
              + ", ".join(f"{b / 2**20:.1f} MiB ({b / full:.3f}x)" for b in per_rank)
              + f"; max ratio {max(per_rank) / full:.3f} (from the plan alone: {max(predicted) / full:.3f})")
        print(f"Qwen2.5-VL-7B-shaped decoder ({qwen_scaled}): unsharded {q_full / 2**20:.1f} MiB; per rank "
              + ", ".join(f"{b / 2**20:.1f} MiB ({b / q_full:.3f}x)" for b in q_per_rank)
              + f" (from the plan alone: max {max(q_predicted) / q_full:.3f}x)")
        print("\n== all-reduces per layer (one forward) ==")
        for name, per_layer in reduces.items():
            print(f"{name}: {per_layer:g}")
        print(f"\n== encode time, T5 gated-gelu {heavy}, batch 1 x {args.seq} tokens, median of {args.repeats}, interleaved ==")
        print(f"1 process x 1 thread: {timing['one_process_s']:.3f} s  (all: "
              + " ".join(f"{t:.3f}" for t in timing["one_process_all"]) + ")")
        print(f"{world} ranks x 1 thread: {timing['two_ranks_s']:.3f} s  (all: "
              + " ".join(f"{t:.3f}" for t in timing["two_ranks_all"]) + ")")
        print(f"time inside all-reduces in one sharded forward (rank 0): {timing['all_reduce_s']:.3f} s")
        print(f"speed-up: {timing['one_process_s'] / timing['two_ranks_s']:.2f}x (medians), "
              f"{min(timing['one_process_all']) / min(timing['two_ranks_all']):.2f}x (fastest rounds); "
              f"max abs diff vs one process: {timing['max_abs_diff']:.2e} (outputs up to "
              f"{timing['max_abs_output']:.1f}: relative {timing['max_abs_diff'] / timing['max_abs_output']:.1e})")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
