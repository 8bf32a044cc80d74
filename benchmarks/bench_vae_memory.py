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

Modes: the whole decode of the clip (one process, a child of rank 0) and the row split over the ranks. Whether
splitting frames too would lower the peak is read off the same decodes: Wan decodes one latent frame at a time
through its causal caches, so a frame split over 2 ranks gives one rank the first ceil(T / 2) latent frames and the
other the rest (it needs the caches of the first ones, which a frame split would hand over). The tracking hook
takes the peak of each part apart: the first part's peak, and the second part's peak less the outputs of the first
part (which that rank would not hold; the final concatenation of the whole output stays counted, as diffpar gathers
the whole output on every rank). A frame split's per-rank peak is the larger of the two; "rows and frames" is the
same split of the row-split decode.
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


class FramePartPeaks:
    """Splits the tracked peak of one decode at the decoder call that starts latent frame `first_of_second`: the
    peak before it, and the peak from it on less the outputs of the earlier calls (still held by the VAE's loop)."""

    def __init__(self, vae, tracker: LiveTensorBytes, first_of_second: int):
        self.tracker, self.first_of_second = tracker, first_of_second
        self.calls, self.frames_seen, self.earlier_output_bytes, self.first_peak = 0, 0, 0, None
        self.hooks = [vae.decoder.register_forward_pre_hook(self.before_call),
                      vae.decoder.register_forward_hook(self.after_call)]

    def before_call(self, module, args):
        if self.first_peak is None and self.frames_seen >= self.first_of_second:
            self.first_peak = self.tracker.peak
            self.tracker.peak = self.tracker.bytes

    def after_call(self, module, args, out):
        self.frames_seen += args[0].shape[2]
        if self.first_peak is None:
            self.earlier_output_bytes += out.untyped_storage().nbytes()

    def close(self):
        for h in self.hooks:
            h.remove()
        second = self.tracker.peak - self.earlier_output_bytes
        return self.first_peak / 2**20, second / 2**20, max(self.first_peak, self.tracker.peak) / 2**20


def measure(vae, latents):
    """Figures of one decode (MiB, seconds) and its output."""
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    with LiveTensorBytes() as tracker:
        parts = FramePartPeaks(vae, tracker, (latents.shape[2] + 1) // 2)
        out = tiny_vaes.decode(vae, latents)
    seconds = time.perf_counter() - start
    first, second, tensors = parts.close()
    return {"tensors": tensors, "resident": (rss_kib("VmHWM") - before) / 1024, "time": seconds,
            "first_part": first, "second_part": second}, out


def whole_child(args):
    torch.set_num_threads(1)
    track_live_memory()
    vae = build()
    results, out = measure(vae, latents_for(args, args.frames))
    torch.save(out, args.whole + ".pt")
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
    dist.barrier()
    mine, split_out = measure(vae, latents_for(args, args.frames))
    mine["bands"] = state.last_sizes
    handle.detach()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, mine)
    if rank != 0:
        return
    child.wait()
    if child.returncode:
        raise SystemExit(f"the whole-decode child failed ({child.returncode})")
    with open(whole_path) as f:
        whole = json.load(f)
    reference = torch.load(whole_path + ".pt")
    half = (args.frames + 1) // 2
    split = {k: max(r[k] for r in per_rank) for k in ("tensors", "resident", "time", "first_part", "second_part")}
    print(f"VAE: AutoencoderKLWan, Wan 2.1 config {WAN21}, random weights, fp32, 1 thread per process")
    print(f"latent (1, 16, {args.frames}, {args.height}, {args.width}) -> image {tuple(split_out.shape)}; "
          f"bands {per_rank[0]['bands']} latent rows; frame split: latent frames [0, {half}) and [{half}, "
          f"{args.frames})")
    base_t, base_r = whole["tensors"], whole["resident"]

    def line(label, tensors, resident=None, seconds=None, note=""):
        text = f"{label:44s} peak tensors {tensors:8.1f} MiB ({tensors / base_t:.2f}x)"
        if resident is not None:
            text += f", resident +{resident:8.1f} MiB ({resident / base_r:.2f}x), {seconds:6.1f} s"
        print(text + note)

    line("whole decode", whole["tensors"], whole["resident"], whole["time"])
    line(f"row split x{world}", split["tensors"], split["resident"], split["time"], " (worst rank)")
    line("frame split x2 (derived)", max(whole["first_part"], whole["second_part"]),
         note=f"  (first frames {whole['first_part']:.1f}, last frames {whole['second_part']:.1f} MiB)")
    line(f"rows x{world} and frames x2 (derived)", max(split["first_part"], split["second_part"]),
         note=f"  (first frames {split['first_part']:.1f}, last frames {split['second_part']:.1f} MiB; "
              f"{2 * world} ranks)")
    print(f"max abs diff, row split vs whole: {(split_out - reference).abs().max().item():.2e}")
    print(f"wall time {time.perf_counter() - start:.0f} s; load average (1 min) {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores")


if __name__ == "__main__":
    main()
