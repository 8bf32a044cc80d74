"""Transformer tensor parallelism: weight bytes per rank, and the speed of each layout at world 2.

    torchrun --nproc_per_node=2 benchmarks/bench_tp.py

Every figure comes from this one run, each process on one thread (gloo on CPU):
1. weight bytes one rank holds under tp_size=2 and 4, from the plans on meta-device models with the real
   configurations (FLUX.1-dev, Qwen-Image, Wan2.1-T2V-14B, Z-Image-Turbo; bf16), and measured on the
   benchmark model after sharding (both plans), which checks the accounting;
2. time of one forward of a Flux-shaped transformer (8 heads of 64, 2 double + 4 single blocks) on a long
   sequence (4096 image + 128 text tokens, a 1024 px FLUX image): one process on one thread (rank 0 alone while
   the other rank waits at a barrier) vs each 2-rank layout: Ulysses, Ring, tp with diffusers' `_tp_plan`
   (translated into diffpar's shard plan) and tp with diffpar's own plan; both run on diffpar's engine. Layouts are interleaved round by round so all see the same background load;
   medians after a warm-up round. Same outputs checked against the one-process run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import diffpar
from diffpar.compat import diffusers_tp
from diffpar.errors import UnsupportedError
from diffpar.families.transformers import tp_plans
from diffpar.mesh import ensure_process_group

REAL_CONFIGS = {
    "FLUX.1-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))),
    "Qwen-Image": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))),
    "Wan2.1-T2V-14B": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads")),
    "Z-Image-Turbo": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
        n_heads=30, n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])),
}


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def real_model_bytes():
    import diffusers

    rows = []
    for label, (cls_name, config) in REAL_CONFIGS.items():
        with torch.device("meta"):
            model = getattr(diffusers, cls_name)(**config)
        for tp in (2, 4):
            try:
                acc = tp_plans.shard_plan_for(model, tp).weight_bytes(model, bytes_per_element=2)
            except UnsupportedError as exc:  # e.g. Z-Image's 30 heads on 4 ranks: the plan refuses it
                rows.append((label, tp, None, None, str(exc).split(":")[0].split(" of ")[0]))
                continue
            rows.append((label, tp, acc["full"], acc["per_rank"], acc["sharded"] / acc["full"]))
    return rows


def build_flux(heads=8, head_dim=64, layers=2, single_layers=4, seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=512, pooled_projection_dim=256, axes_dims_rope=(16, 24, 24),
    ).eval()
    return model


def flux_inputs(seq: int, text: int, seed=1):
    g = torch.Generator().manual_seed(seed)
    side = int(seq ** 0.5)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(seq // side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return dict(
        hidden_states=torch.randn(1, seq, 64, generator=g), encoder_hidden_states=torch.randn(1, text, 512, generator=g),
        pooled_projections=torch.randn(1, 256, generator=g), timestep=torch.full((1,), 0.5), img_ids=img_ids,
        txt_ids=torch.zeros(text, 3), return_dict=False,
    )


def local_bytes(model) -> int:
    """Parameter bytes this rank holds (shards are plain tensors of this rank's slice)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def plan_with(force_ours: bool, model, tp: int):
    """The shard plan of `model`, from diffpar's own plan when `force_ours` (as if diffusers had no `_tp_plan`)."""
    original = diffusers_tp.native_tp_plan
    if force_ours:
        diffusers_tp.native_tp_plan = lambda m: None
    try:
        return tp_plans.shard_plan_for(model, tp)
    finally:
        diffusers_tp.native_tp_plan = original


LAYOUTS = {
    "ulysses_size=2": (dict(ulysses_size=2), False),
    "ring_size=2": (dict(ring_size=2), False),
    "tp_size=2 (diffusers _tp_plan, translated)": (dict(tp_size=2), False),
    "tp_size=2 (diffpar plan)": (dict(tp_size=2), True),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--text", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    ensure_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with torchrun --nproc_per_node=2"

    if rank == 0:
        print("## Weight bytes per rank (bf16, from the plans, real configurations)\n")
        print("| model | tp | whole model | per rank | per rank / whole | share of weights split |")
        print("|---|---|---|---|---|---|")
        for label, tp, full, per_rank, share in real_model_bytes():
            if full is None:
                print(f"| {label} | {tp} | refused ({share}) | | | |")
                continue
            print(f"| {label} | {tp} | {gib(full)} | {gib(per_rank)} | {per_rank / full:.3f} | {share:.3f} |")

    inputs = flux_inputs(args.seq, args.text)
    reference_model = build_flux() if rank == 0 else None
    models, handles = {}, {}
    for label, (config, force) in LAYOUTS.items():
        model = build_flux()
        predicted = plan_with(force, model, 2).weight_bytes(model)["per_rank"] if "tp" in label else None
        original = diffusers_tp.native_tp_plan
        if force:
            diffusers_tp.native_tp_plan = lambda m: None
        try:
            handles[label] = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
        finally:
            diffusers_tp.native_tp_plan = original
        models[label] = (model, local_bytes(model), predicted)

    def run(model):
        with torch.no_grad():
            return model(**inputs)[0]

    times = {label: [] for label in ["one process, 1 thread", *LAYOUTS]}
    outputs = {}
    for round_ in range(args.repeats + 1):
        if rank == 0:
            start = time.perf_counter()
            outputs["one process, 1 thread"] = run(reference_model)
            elapsed = time.perf_counter() - start
        dist.barrier()
        if round_:
            times["one process, 1 thread"].append(elapsed if rank == 0 else 0.0)
        for label, (model, _, _) in models.items():
            dist.barrier()
            start = time.perf_counter()
            outputs[label] = run(model)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if round_:
                times[label].append(elapsed.item())

    if rank == 0:
        full = local_bytes(reference_model)
        base = statistics.median(times["one process, 1 thread"])
        print(f"\n## One forward, Flux-shaped (8x64 heads, 2+4 blocks), {args.seq} image + {args.text} text tokens\n")
        print("| layout | median s | speed vs 1 process | max abs diff | weight bytes / rank (measured; plan) |")
        print("|---|---|---|---|---|")
        print(f"| one process, 1 thread | {base:.2f} | 1.00x | - | {full / 2**20:.1f} MiB |")
        for label, (model, mine, predicted) in models.items():
            t = statistics.median(times[label])
            diff = (outputs[label] - outputs["one process, 1 thread"]).abs().max().item()
            plan = f"; {predicted / 2**20:.1f} MiB" if predicted else ""
            print(f"| {label} | {t:.2f} | {base / t:.2f}x | {diff:.1e} | {mine / 2**20:.1f} MiB{plan} |")
    for h in handles.values():
        h.detach()
    dist.barrier()


if __name__ == "__main__":
    main()
