"""Per-rank peak memory of a split VAE decode vs the whole decode, on a VAE with real channel widths.

    torchrun --nproc_per_node=2 benchmarks/bench_vae_memory.py [--height 20] [--width 12] [--frames 2]

The VAE is AutoencoderKLWan with Wan 2.1's real configuration (base_dim 96, dim_mult (1, 2, 4, 4), 2 resnets per
block, z_dim 16, temporal downsampling (False, True, True)), random weights, fp32, built on CPU in every process.
The default latent (16, 2, 20, 12) is a 160 x 96 px, 5-frame clip: at real widths one whole decode takes ~40 s on
one loaded CPU core, and the whole run stays under ~3 minutes at 2 ranks. Bands are 10 latent rows per rank.

Peak memory is measured two ways during the same decode:
- tensors: a tracking allocator hook (bench_vae.LiveTensorBytes, a TorchDispatchMode) counts the bytes of every
  tensor storage an op allocates, from its allocation until the last tensor viewing it is freed; the peak is the
  most bytes live at once. It does not see scratch memory inside kernels (oneDNN workspaces). This is the figure
  the ratio target (<= 0.6x) is judged on;
- resident: growth of the peak resident set (VmHWM, reset just before the decode) over the resident set before
  it, with glibc's mmap / trim thresholds fixed at 1 MiB so freed tensors leave the resident set (bench_vae.py).
Both include the decoded output (the split gathers the whole output on every rank, as diffpar does).

Modes: the whole decode of the clip (one process, a child of rank 0); the row split over the ranks; and, for the
question whether splitting frames too would lower the peak, the whole decode of the first half of the latent frames
(ceil(T / 2)), which is what a frame-split rank would decode at most before its outputs are gathered, and the row
split of that half. Wan decodes one latent frame at a time through its causal caches already, so a frame split can
only spread the chunks and the output, not shrink a chunk's working set; the figures show how much that is worth.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from bench_vae import LiveTensorBytes, rss_kib, track_live_memory
from diffpar import mesh
from diffpar.config import ParallelismConfig
from diffpar.families.vaes.base import VaeAdapter
from diffpar.handle import ParallelHandle
from diffpar.testing import tiny_vaes

WAN21 = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


def build():
    import diffpar.families.catalog  # noqa: F401  (registers the VAE classes)
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**WAN21, latents_mean=[0.0] * 16, latents_std=[1.0] * 16).eval()
    return vae


def latents_for(args, frames):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, args.frames, args.height, args.width, generator=g)[:, :, :frames]


def measure(vae, latents):
    """(peak tensor MiB, peak resident growth MiB, seconds, output) of one decode."""
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    with LiveTensorBytes() as tracker:
        out = tiny_vaes.decode(vae, latents)
    seconds = time.perf_counter() - start
    return tracker.peak / 2**20, (rss_kib("VmHWM") - before) / 1024, seconds, out


def whole_child(args):
    torch.set_num_threads(1)
    track_live_memory()
    vae = build()
    results = {}
    for frames in (args.frames, (args.frames + 1) // 2):
        tensors, resident, seconds, out = measure(vae, latents_for(args, frames))
        results[frames] = {"tensors": tensors, "resident": resident, "time": seconds}
        if frames == args.frames:
            torch.save(out, args.whole + ".pt")
        del out
    with open(args.whole, "w") as f:
        json.dump(results, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--height", type=int, default=20, help="latent rows (image = 8x)")
    parser.add_argument("--width", type=int, default=12, help="latent columns (image = 8x)")
    parser.add_argument("--frames", type=int, default=2, help="latent frames (image = 1 + 4 (T - 1))")
    parser.add_argument("--whole", help=argparse.SUPPRESS)  # internal: run the one-process child
    args = parser.parse_args()
    if args.whole:
        return whole_child(args)

    torch.set_num_threads(1)
    if not mesh.ensure_process_group():
        raise SystemExit("launch with torchrun --nproc_per_node=2 benchmarks/bench_vae_memory.py")
    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    whole_path = os.path.join(tempfile.mkdtemp(prefix="bench_vae_memory-"), "whole.json")
    child = None
    if rank == 0:  # the whole decodes run in a fresh process, at the same time as the split ones
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        child = subprocess.Popen([sys.executable, __file__, "--whole", whole_path, "--height", str(args.height),
                                  "--width", str(args.width), "--frames", str(args.frames)], env=env)

    track_live_memory()
    vae = build()
    config = ParallelismConfig(vae_split_min_rows=0)
    adapter = VaeAdapter()
    handle = ParallelHandle(target=vae)
    state = adapter.apply(vae, adapter.plan(vae, "vae", world, config), dist.group.WORLD, handle, config, None)
    handle.commit()
    mine = {}
    for frames in (args.frames, (args.frames + 1) // 2):
        dist.barrier()
        tensors, resident, seconds, out = measure(vae, latents_for(args, frames))
        mine[frames] = {"tensors": tensors, "resident": resident, "time": seconds, "bands": state.last_sizes}
        if frames == args.frames:
            split_out = out
        del out
    handle.detach()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, mine)
    if rank != 0:
        return
    child.wait()
    if child.returncode:
        raise SystemExit(f"the whole-decode child failed ({child.returncode})")
    with open(whole_path) as f:
        whole = {int(k): v for k, v in json.load(f).items()}
    reference = torch.load(whole_path + ".pt")
    half = (args.frames + 1) // 2
    print(f"VAE: AutoencoderKLWan, Wan 2.1 config {WAN21}, random weights, fp32, 1 thread per process")
    print(f"latent (1, 16, {args.frames}, {args.height}, {args.width}) -> image {tuple(split_out.shape)}; "
          f"bands {per_rank[0][args.frames]['bands']} latent rows")
    rows = [("whole decode, all frames", whole[args.frames], None),
            (f"row split x{world}, all frames", None, args.frames),
            (f"whole decode, first {half} latent frame(s) (a frame-split rank's share)", whole[half], None),
            (f"row split x{world}, first {half} latent frame(s) (rows and frames)", None, half)]
    base_t, base_r = whole[args.frames]["tensors"], whole[args.frames]["resident"]
    for label, one, frames in rows:
        figs = one if one is not None else {k: max(r[frames][k] for r in per_rank) for k in ("tensors", "resident",
                                                                                               "time")}
        print(f"{label:72s} peak tensors {figs['tensors']:8.1f} MiB ({figs['tensors'] / base_t:.2f}x), resident "
              f"+{figs['resident']:8.1f} MiB ({figs['resident'] / base_r:.2f}x), {figs['time']:6.1f} s"
              + ("" if one is not None else " (worst rank)"))
    print(f"max abs diff, row split vs whole: {(split_out - reference).abs().max().item():.2e}")
    print(f"wall time {time.perf_counter() - start:.0f} s; load average (1 min) {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")


if __name__ == "__main__":
    main()
