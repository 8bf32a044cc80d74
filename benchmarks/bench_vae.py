"""Split VAE decode: 2 ranks x 1 thread vs 1 process x 1 thread, on a VAE shaped like Flux.1's.

    torchrun --nproc_per_node=2 benchmarks/bench_vae.py [--latent 128] [--repeats 1] [--threads2]

The VAE is `tiny_vaes.build("kl_real")`: AutoencoderKL with 4 blocks, 2 resnets per block (3 in the decoder), a
mid-block attention and 16 latent channels like Flux.1's, with channels (32, 64, 128, 128) instead of
(128, 256, 512, 512) so a 1024 px decode takes tens of seconds on one core.

The one-process decode runs in a fresh child process that rank 0 starts (the ranks wait meanwhile), so neither
measurement inherits the other's allocator state. Printed, all from this one run:
- decode time, one process vs the split over the ranks (slowest rank), and their ratio; times are taken first,
  with glibc's default allocator settings, as a user runs;
- peak memory per process, in a second pass: growth of the peak resident set (VmHWM, reset through
  /proc/self/clear_refs just before the decode) over the resident set before it, after fixing glibc's mmap and
  trim thresholds at 1 MiB (mallopt), so every tensor above 1 MiB is mapped when allocated and unmapped when freed
  and the resident set follows the live tensors (by default glibc raises its thresholds after the first frees and
  keeps freed blocks, by a different amount in each process). The peak is the decode's working set, output
  included; the ratio is the worst rank's over the one process's;
- the same peak counted by a tracking allocator (LiveTensorBytes: bytes of tensor storages alive at once);
- bytes each rank sent, by kind, and the halo bytes against the halo minimum: for every convolution whose kernel
  spans rows, (kernel extent - 1) rows x channels x width x batch x 4 bytes per band edge, from the layer shapes
  recorded during the one-process decode;
- max abs difference, split vs one process.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
import weakref

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffpar import mesh
from diffpar.families.vaes.base import VAE_CLASSES, VaeAdapter
from diffpar.families.vaes.rules import CONV
from diffpar.config import ParallelismConfig
from diffpar.handle import ParallelHandle
from diffpar.testing import tiny_vaes


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def track_live_memory() -> None:
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)
    libc.malloc_trim(0)


class LiveTensorBytes(TorchDispatchMode):
    """A tracking allocator for CPU tensors: every storage an op allocates counts from then until the last tensor
    viewing it is garbage; the peak is the most bytes live at once. It sees what PyTorch allocates for op outputs,
    not scratch memory inside kernels (oneDNN workspaces), in both modes alike."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # storage pointer -> [bytes, tensors viewing it]
        self.bytes = 0
        self.peak = 0

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.bytes -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        seen = {id(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or id(t) in seen:
                continue  # in-place ops hand back their input
            key = t.untyped_storage().data_ptr()
            if key in self.live:
                self.live[key][1] += 1
            elif key in inputs or key == 0:
                continue  # a view of something allocated before tracking started
            else:
                self.live[key] = [t.untyped_storage().nbytes(), 1]
                self.bytes += self.live[key][0]
                self.peak = max(self.peak, self.bytes)
            weakref.finalize(t, self._release, key)
        return out


def tracked_peak_mib(vae, latents) -> float:
    with LiveTensorBytes() as tracker:
        out = tiny_vaes.decode(vae, latents)
        del out
    return tracker.peak / 2**20


def measured_decode(vae, latents):
    """(seconds, peak resident growth in MiB, output)."""
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    out = tiny_vaes.decode(vae, latents)
    seconds = time.perf_counter() - start
    return seconds, (rss_kib("VmHWM") - before) / 1024, out


def record_halo_minimum(vae, world: int, total: list):
    """Hooks adding up, during a whole decode, the bytes that must cross band edges: for each convolution whose
    kernel spans rows, (extent - 1) rows of its input per edge."""

    def hook(module, args):
        x = args[0]
        rows = module.dilation[0] * (module.kernel_size[0] - 1)
        total.append(rows * x.shape[0] * x.shape[1] * x.shape[-1] * x.element_size() * (world - 1))

    entry = VAE_CLASSES.lookup(vae)
    return [m.register_forward_pre_hook(hook) for m in vae.decoder.modules()
            if entry.rule_for(m) is CONV and m.kernel_size[0] > 1]


def build(args):
    vae, make_latents, _ = tiny_vaes.build("kl_real")
    latents = make_latents(height=args.latent, width=args.latent, batch=args.batch)
    tiny_vaes.decode(vae, make_latents(height=16, width=16))  # warm up kernels
    return vae, make_latents, latents


def one_process(args):
    """The child: one process, one thread. Writes its figures as JSON and its image to args.single."""
    torch.set_num_threads(1)
    vae, _, latents = build(args)
    halo: list[int] = []
    hooks = record_halo_minimum(vae, args.world, halo)
    times = []
    for _ in range(args.repeats):
        seconds, _, out = measured_decode(vae, latents)
        times.append(seconds)
        for h in hooks:
            h.remove()
        hooks = []
    threads2 = None
    if args.threads2:
        torch.set_num_threads(2)
        threads2 = min(measured_decode(vae, latents)[0] for _ in range(args.repeats))
        torch.set_num_threads(1)
    del out
    track_live_memory()
    _, peak, out = measured_decode(vae, latents)
    tracked = tracked_peak_mib(vae, latents)
    torch.save(out, args.single + ".pt")
    with open(args.single, "w") as f:
        json.dump({"time": min(times), "threads2": threads2, "peak": peak, "tracked": tracked,
                   "halo_min": sum(halo)}, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--latent", type=int, default=128, help="latent height and width (image = 8x)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="timed decodes per mode (the fastest is kept)")
    parser.add_argument("--threads2", action="store_true", help="also time one process with 2 threads")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # internal: run the one-process child
    parser.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        return one_process(args)

    torch.set_num_threads(1)
    if not mesh.ensure_process_group():
        raise SystemExit("launch with torchrun --nproc_per_node=2 benchmarks/bench_vae.py")
    rank, world = dist.get_rank(), dist.get_world_size()
    load_before = os.getloadavg()[0]

    # One process, in a fresh child of rank 0, while every rank waits.
    tmp = tempfile.mkdtemp(prefix="bench_vae-")
    single_path = os.path.join(tmp, "single.json")
    if rank == 0:
        child_env = {k: v for k, v in os.environ.items()
                     if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        subprocess.run([sys.executable, __file__, "--single", single_path, "--world", str(world),
                        "--latent", str(args.latent), "--batch", str(args.batch), "--repeats", str(args.repeats)]
                       + (["--threads2"] if args.threads2 else []), check=True, env=child_env)
    dist.barrier()

    # Split over every rank: time first (default allocator), then memory.
    vae, make_latents, latents = build(args)
    config = ParallelismConfig(vae_split_min_rows=0)
    adapter = VaeAdapter()
    plan = adapter.plan(vae, "vae", world, config)
    handle = ParallelHandle(target=vae)
    state = adapter.apply(vae, plan, dist.group.WORLD, handle, config, None)
    handle.commit()
    tiny_vaes.decode(vae, make_latents(height=16, width=16))  # warm up the split path
    times = []
    for _ in range(args.repeats):
        state.stats.reset()
        dist.barrier()
        seconds, _, out = measured_decode(vae, latents)
        times.append(seconds)
    stats = state.stats.as_dict()
    del out
    track_live_memory()
    dist.barrier()
    _, peak, out = measured_decode(vae, latents)
    dist.barrier()
    tracked = tracked_peak_mib(vae, latents)
    handle.detach()

    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"time": min(times), "peak": peak, "tracked": tracked, "stats": stats})
    if rank != 0:
        return
    with open(single_path) as f:
        single = json.load(f)
    reference = torch.load(single_path + ".pt")
    split_time = max(r["time"] for r in per_rank)
    print(f"VAE: kl_real (AutoencoderKL, 4 blocks, channels (32, 64, 128, 128), 16 latent channels), "
          f"latent {tuple(latents.shape)} -> image {tuple(out.shape)}, fp32, bands {state.last_sizes}")
    print(f"decode, 1 process x 1 thread : {single['time']:7.2f} s   peak +{single['peak']:8.1f} MiB resident, "
          f"{single['tracked']:8.1f} MiB of tensors")
    if single["threads2"] is not None:
        print(f"decode, 1 process x 2 threads: {single['threads2']:7.2f} s")
    for r, info in enumerate(per_rank):
        print(f"decode, split, rank {r} x 1 thread: {info['time']:7.2f} s   peak +{info['peak']:8.1f} MiB resident, "
              f"{info['tracked']:8.1f} MiB of tensors")
    print(f"speed ratio (1 process / {world} ranks): {single['time'] / split_time:.2f}x")
    print(f"peak memory ratio (worst rank / 1 process): resident {max(r['peak'] for r in per_rank) / single['peak']:.2f}x, "
          f"tensors {max(r['tracked'] for r in per_rank) / single['tracked']:.2f}x")
    halo_sent = sum(r["stats"]["halo_bytes"] for r in per_rank)
    print(f"halo bytes sent, all ranks: {halo_sent / 2**20:.2f} MiB; halo minimum {single['halo_min'] / 2**20:.2f} "
          f"MiB; ratio {halo_sent / single['halo_min']:.3f}")
    for r, info in enumerate(per_rank):
        s = info["stats"]
        print(f"rank {r} sent: halo {s['halo_bytes'] / 2**20:.2f} MiB in {s['halo_calls']} exchanges, "
              f"GroupNorm statistics {s['norm_bytes'] / 2**10:.1f} KiB in {s['norm_calls']} gathers, "
              f"attention K/V + output {s['gather_bytes'] / 2**20:.2f} MiB in {s['gather_calls']} gathers, "
              f"{s['calls']} communication calls in all")
    print(f"max abs diff split vs one process: {(out - reference).abs().max().item():.2e}")
    print(f"machine load average (1 min) at start / end: {load_before:.1f} / {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (other work on the machine slows the split more: its ranks wait for each other)")


if __name__ == "__main__":
    main()
