"""Sharded loading (`weights_from`): per-rank peak device memory while enabling, bytes read, and host memory, vs
the whole model.

    torchrun --nproc_per_node=2 benchmarks/bench_sharded_loading.py [--device cpu|cuda] [--depth N] [--small]
                                                                    [--dir DIR] [--baseline] [--no-forward]

Real widths, scaled in depth only (the full models are 24 GB and 9.5 GB of bf16 files): a FLUX.1-dev-shaped
transformer (24 heads of 128, joint_attention_dim 4096, in_channels 64, guidance) with `--depth` N double-stream
and N single-stream blocks (of 19 and 38), and a T5-XXL-shaped encoder (d_model 4096, 64 heads of 64, d_ff 10240
gated-gelu, vocabulary 32128) with 2N layers (of 24), in bf16 (default N=1). `--small`: toy widths, for the test
(tests/test_sharded_loading.py). Rank 0 writes them once as a saved pipeline directory (the other components
tiny; the two large modules' safetensors written directly, a repeated seeded pattern: fast to write, and not zero,
so the forward below means something); every rank then builds the pipeline with
`diffpar.empty_pipeline(dir, ["transformer", "text_encoder_2"])` (both on the meta device) and enables
tp_size=world with the T5 in extra_parallel_modules and `weights_from` naming both subfolders and the device.

Per rank it prints, from the plan (`diffpar.plan`, before enabling): the shard (the bytes this rank reads), the
largest single tensor this rank reads (its part of one weight: "one layer"), the whole model; and measured while
`enable_cache` runs: the peak device memory (CUDA: `torch.cuda.reset_peak_memory_stats()` before,
`max_memory_allocated()` after, minus what was allocated before; both devices: a dispatch mode that adds up the
live bytes of every tensor a torch op allocates on the device, freed when its storage dies), checked against
shard + largest tensor + slack (64 KiB of small tensors; on CUDA also the allocator's rounding: `CUDA_UNSPLIT`;
the bytes CUDA was asked for, memory_stats' "requested_bytes", are checked without it), the bytes read and held
afterwards, and host memory (peak RSS from getrusage; anonymous / file-backed RSS from /proc/self/status sampled
by a thread: the file-backed part is the page cache of the memory-mapped files, shared by every rank). Then
(unless --no-forward) one tensor-parallel forward of each module on the device (c10d all_reduce / all_gather: with
gloo these take CUDA tensors too), vs the same module loaded whole with from_pretrained on rank 0. `--baseline`
loads both files whole in each process (what tensor parallelism needed before) and prints that host peak too. The
last line of rank 0's output is one JSON object with every figure; the exit status is 1 if a check failed.

`--device cuda` on a one-GPU machine: every rank on cuda:0 over gloo (NCCL refuses a duplicate GPU); loading issues
no collective on device tensors (the agreement exchanges CPU tensors) and the forward only c10d ones (torch's
functional collectives do not run on gloo with CUDA tensors; diffpar's tensor-parallel layers do not use them).
`--device cpu` runs the same code with the CPU as the device (no CUDA figure; the dispatch-mode peak is checked).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import diffpar
from diffpar.mesh import ensure_process_group, gather_json

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
              feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
# --small: the same structure at toy widths (heads divisible by 2 and 4).
FLUX_SMALL = dict(FLUX_DEV, in_channels=16, attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                  pooled_projection_dim=24, axes_dims_rope=(4, 6, 6))
T5_SMALL = dict(T5_XXL, vocab_size=128, d_model=32, d_kv=8, d_ff=80, num_heads=4)
LARGE = ("transformer", "text_encoder_2")
# torch.cuda.max_memory_allocated counts the caching allocator's blocks, not the bytes asked for (the CUDA context
# and cached free memory are in neither): a request of at most 1 MiB gets a block rounded up to 512 bytes; a larger
# one may get up to 1 MiB more (a rest of its segment of at most 1 MiB is not split off: `should_split` in torch's
# CUDACachingAllocator). The bytes asked for are memory_stats()'s "requested_bytes", checked without this slack.
CUDA_ROUND = 512
CUDA_UNSPLIT = 1 << 20
# Small tensors besides the weights (moved buffers, scalars of the engines; 8 bytes measured on CPU): far below one
# layer, and small enough that the bound stays under the whole model at the test's toy widths.
SMALL_TENSORS = 64 << 10


def shapes(small: bool, depth: int) -> tuple[dict, dict]:
    flux, t5 = (FLUX_SMALL, T5_SMALL) if small else (FLUX_DEV, T5_XXL)
    return dict(flux, num_layers=depth, num_single_layers=depth), dict(t5, num_layers=2 * depth)


def _empty(flux: dict, t5: dict):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with init_empty_weights():
        return {"transformer": FluxTransformer2DModel.from_config(flux).to(torch.bfloat16).eval(),
                "text_encoder_2": T5EncoderModel._from_config(T5Config(**t5), dtype=torch.bfloat16).eval()}


PATTERN = 65521  # a prime: the repeated pattern does not line up with rows or heads
SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
WEIGHT_FILES = {"transformer": "diffusion_pytorch_model.safetensors", "text_encoder_2": "model.safetensors"}


def write_safetensors(path: str, module: torch.nn.Module, seed: int) -> None:
    """`module`'s parameters and persistent buffers (it may be on meta: only names, shapes and dtypes are used)
    written as one safetensors file, every tensor holding a seeded normal pattern (std 0.02) repeated. Nothing of
    the model's size is allocated: a 64 MiB block of the pattern is written again and again, at disk speed
    (drawing, or even filling, billions of values in torch first took minutes on one core)."""
    names, tensors = [], []
    for name, p in module.named_parameters():  # tied weights once (T5's shared), as save_pretrained writes them
        names.append(name)
        tensors.append(p)
    for owner_path, owner in module.named_modules():
        for bname, buf in owner._buffers.items():
            if buf is not None and bname not in owner._non_persistent_buffers_set:
                names.append(f"{owner_path}.{bname}" if owner_path else bname)
                tensors.append(buf)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in zip(names, tensors):
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    pattern = torch.randn(PATTERN, generator=torch.Generator().manual_seed(seed)) * 0.02
    blocks = {}  # dtype -> bytes of the pattern repeated (a whole number of patterns, so it continues seamlessly)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for t in tensors:
            if t.dtype not in blocks:
                repeats = max(1, (64 << 20) // (PATTERN * t.element_size()))
                blocks[t.dtype] = pattern.to(t.dtype).repeat(repeats).view(torch.uint8).numpy().tobytes()
            block, left = blocks[t.dtype], t.numel() * t.element_size()
            while left:
                f.write(block[:left] if left < len(block) else block)
                left -= min(left, len(block))


def write_files(directory: str, flux: dict, t5: dict) -> float:
    """A saved pipeline directory (model_index.json + subfolders, as save_pretrained writes it): the two large
    modules in bf16 with the shapes asked for (their config.json and one safetensors file each, written by
    `write_safetensors`), the rest (scheduler, VAE, CLIP, tokenizers: not measured) tiny. Returns the seconds it
    took (0 when the directory already holds these shapes)."""
    marker = os.path.join(directory, "bench_shapes.json")
    wanted = {"transformer": flux, "text_encoder_2": t5}
    if os.path.isfile(os.path.join(directory, "model_index.json")):
        with open(marker) if os.path.isfile(marker) else open(os.devnull) as f:
            found = f.read()
        if found and json.loads(found) == json.loads(json.dumps(wanted)):
            return 0.0
        raise SystemExit(f"{directory} holds another pipeline (other shapes or depth): pass another --dir")
    from diffpar.testing import tiny_pipelines

    began = time.perf_counter()
    # The tiny pipeline saved whole gives model_index.json and the small components; the two large subfolders
    # are then replaced by the real-shaped ones.
    tiny_pipelines.build_tiny_flux_pipeline().save_pretrained(directory)
    for seed, (name, module) in enumerate(_empty(flux, t5).items()):
        folder = os.path.join(directory, name)
        for f in os.listdir(folder):
            os.remove(os.path.join(folder, f))
        if hasattr(module, "tie_weights"):
            module.tie_weights()  # T5's embedding is saved once, as from_pretrained would
        if name == "transformer":
            module.save_config(folder)
        else:
            module.config.save_pretrained(folder)
        write_safetensors(os.path.join(folder, WEIGHT_FILES[name]), module, seed)
    with open(marker, "w") as f:
        json.dump(wanted, f)
    return time.perf_counter() - began


def host_memory() -> dict:
    status = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                status[key] = int(value.split()[0]) * 1024
    status["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return status


class PeakSampler:
    """Samples /proc/self/status every 5 ms in a thread: the peak of private (anonymous) and file-backed RSS,
    which getrusage's single peak cannot tell apart."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            now = host_memory()
            for key in self.peak:
                self.peak[key] = max(self.peak[key], now[key])
            self._stop.wait(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class LiveDeviceBytes(TorchDispatchMode):
    """The live bytes of the tensors torch ops allocate on `device` while active, and their peak: an output whose
    storage is no input's (views, and slices of the memory-mapped files, allocate nothing) adds its storage's bytes
    until that storage dies (a weak reference). It sees what an op returns, not the scratch an op allocates and
    frees inside itself (CUDA's max_memory_allocated does)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device_type = device.type
        self.live = self.peak = self.allocations = 0
        self.largest = (0, "")  # (bytes, op) of the largest single allocation
        self._refs = {}  # id(weakref) -> weakref (kept alive until the storage dies)

    def _freed(self, nbytes, ref):
        self.live -= nbytes
        self._refs.pop(id(ref), None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in inputs or storage.nbytes() == 0:
                continue
            inputs.add(storage.data_ptr())
            nbytes = storage.nbytes()
            ref = weakref.ref(storage, lambda r, n=nbytes: self._freed(n, r))
            self._refs[id(ref)] = ref
            self.live += nbytes
            self.allocations += 1
            self.peak = max(self.peak, self.live)
            self.largest = max(self.largest, (nbytes, str(func)))
        return out


def loading_plan_figures(plan, rank: int) -> dict:
    """From diffpar's plan (before anything runs), per module: this rank's shard, the whole, and the largest part
    of one tensor this rank reads (the most one extra in-flight copy can add), and how many tensors it reads."""
    out = {}
    for component in plan.by_role("weights"):
        load = component.payload
        module = load.target_module
        largest, largest_name, allocator = 0, "", 0
        for read in load.reads:
            path = read.paths[0]
            tensor = module.get_buffer(path) if read.is_buffer else module.get_parameter(path)
            size = tensor.element_size()
            numel = math.prod(read.shape)
            if read.dim is not None:
                numel = numel // read.shape[read.dim] * sum(b - a for a, b in read.ranges[rank])
            if numel * size > largest:
                largest, largest_name = numel * size, read.key
            allocator += CUDA_UNSPLIT if numel * size > CUDA_UNSPLIT else CUDA_ROUND
        out[load.name] = {"shard": load.bytes_per_rank[rank], "whole": load.full_bytes, "largest_tensor": largest,
                          "largest_tensor_name": largest_name, "tensors": len(load.reads) + len(load.moved_buffers),
                          "cuda_allocator_slack": allocator + CUDA_UNSPLIT * len(load.moved_buffers)}
    return out


def _inputs(flux: dict, t5: dict, device: torch.device, image_tokens: int, text_tokens: int) -> dict:
    g = torch.Generator().manual_seed(0)  # the same inputs on every rank

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, torch.bfloat16)

    side = int(math.isqrt(image_tokens))
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    transformer = dict(hidden_states=randn(1, side * side, flux["in_channels"]),
                       encoder_hidden_states=randn(1, text_tokens, flux["joint_attention_dim"]),
                       pooled_projections=randn(1, flux["pooled_projection_dim"]),
                       timestep=torch.tensor([0.5], device=device, dtype=torch.bfloat16),
                       guidance=torch.tensor([3.5], device=device, dtype=torch.bfloat16),
                       img_ids=img_ids.reshape(-1, 3).to(device), txt_ids=torch.zeros(text_tokens, 3, device=device),
                       return_dict=False)
    ids = torch.randint(2, t5["vocab_size"], (1, text_tokens), generator=g).to(device)
    return {"transformer": transformer, "text_encoder_2": dict(input_ids=ids)}


def _output(module_name: str, out) -> torch.Tensor:
    return (out[0] if module_name == "transformer" else out.last_hidden_state).float()


def forward_check(pipe, directory: str, flux: dict, t5: dict, device: torch.device, rank: int, small: bool) -> dict:
    """One tensor-parallel forward of each loaded module on the device; rank 0 compares with the module loaded
    whole (from_pretrained) on the same device. The SplitProbe records the collectives (a no-op would issue
    none) and the heads each rank's first attention holds."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    from diffpar.testing.probes import SplitProbe

    inputs = _inputs(flux, t5, device, image_tokens=64 if small else 1024, text_tokens=16 if small else 128)
    report, outputs = {}, {}
    began = time.perf_counter()
    with torch.no_grad(), SplitProbe(pipe.transformer) as probe:
        for name in LARGE:
            outputs[name] = _output(name, getattr(pipe, name)(**inputs[name]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    report["seconds"] = time.perf_counter() - began
    report["split"] = probe.summary()
    report["finite"] = all(bool(torch.isfinite(o).all()) for o in outputs.values())
    if rank == 0:
        loaders = {"transformer": lambda: FluxTransformer2DModel.from_pretrained(
                       os.path.join(directory, "transformer"), torch_dtype=torch.bfloat16),
                   "text_encoder_2": lambda: T5EncoderModel.from_pretrained(
                       os.path.join(directory, "text_encoder_2"), dtype=torch.bfloat16)}
        report["vs_whole"] = {}
        for name in LARGE:
            whole = loaders[name]().to(device).eval()
            with torch.no_grad():
                expected = _output(name, whole(**inputs[name]))
            del whole
            scale = expected.abs().max().item()
            diff = (outputs[name] - expected).abs().max().item()
            report["vs_whole"][name] = {"max_abs_diff": diff, "max_abs": scale, "relative": diff / max(scale, 1e-30)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return report


# bf16, the row-parallel sums split in two: measured at toy widths on CPU, max abs diff / max abs 3e-3 (transformer)
# and 9e-4 (T5); real widths on a GPU not measured yet, hence the margin.
FORWARD_RELATIVE_TOL = 5e-2


def gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB" if abs(n) >= 2**24 else f"{n / 2**20:.2f} MiB"


# A rank whose peer failed in a collective gives up after this (torch's default is 30 minutes); rank 0 writing the
# files is the longest wait (well under a minute at --depth 4 on the lent machine's disk).
GROUP_TIMEOUT = timedelta(seconds=600)


def _setup(device_kind: str) -> torch.device:
    local_rank, world_env = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        if torch.cuda.device_count() < world_env:
            # Several ranks on one GPU: NCCL refuses a duplicate GPU; gloo moves CUDA tensors through c10d.
            dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        if world_env > 1 and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)  # the CPU as the device, also beside a GPU
        device = torch.device("cpu")
    if not ensure_process_group():
        raise SystemExit("launch with: torchrun --nproc_per_node=2 benchmarks/bench_sharded_loading.py")
    return device


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--depth", type=int, default=1,
                        help="N double-stream + N single-stream transformer blocks, 2N T5 layers (real widths)")
    parser.add_argument("--small", action="store_true", help="toy widths (the CPU test)")
    parser.add_argument("--dir", default=None, help="default: /tmp/diffpar_sharded_loading_{real|small}_d{N}")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--no-forward", dest="forward", action="store_false")
    args = parser.parse_args(argv)
    if args.depth < 1:
        raise SystemExit("--depth must be at least 1")
    started = time.perf_counter()
    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 2) // 2)) if args.device == "cuda" else 1)
    directory = args.dir or f"/tmp/diffpar_sharded_loading_{'small' if args.small else 'real'}_d{args.depth}"
    flux, t5 = shapes(args.small, args.depth)
    device = _setup(args.device)
    world, rank = dist.get_world_size(), dist.get_rank()
    write_seconds = 0.0
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        write_seconds = write_files(directory, flux, t5)
    dist.barrier()

    start = host_memory()
    # The recipe of docs/loading.md: the large modules built empty from their saved configs, the rest loaded;
    # weights_from names both subfolders and where the shards go.
    pipe = diffpar.empty_pipeline(directory, list(LARGE), torch_dtype=torch.bfloat16)
    config = diffpar.ParallelismConfig(
        tp_size=world, extra_parallel_modules=["text_encoder_2"],
        weights_from={**{n: os.path.join(directory, n) for n in LARGE}, "device": str(device)})
    planned = loading_plan_figures(diffpar.plan(pipe, parallelism_config=config, world_size=world), rank)
    live = LiveDeviceBytes(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        cuda_before = torch.cuda.memory_allocated()
        requested_before = torch.cuda.memory_stats().get("requested_bytes.all.current", 0)
        torch.cuda.reset_peak_memory_stats()  # the peak while enabling, per rank (each process has its own)
    began = time.perf_counter()
    with PeakSampler() as sampler, live:
        handle = diffpar.enable_cache(pipe, parallelism_config=config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    after = host_memory()

    shard = sum(m["shard"] for m in planned.values())
    whole = sum(m["whole"] for m in planned.values())
    largest = max(m["largest_tensor"] for m in planned.values())
    # Bytes asked for: the shard, one tensor part in flight, and small tensors besides. Blocks (CUDA's
    # max_memory_allocated): that plus the allocator's rounding of each block (one more for the copy's temporary).
    exact_bound = shard + largest + SMALL_TENSORS
    slack = SMALL_TENSORS
    if device.type == "cuda":
        slack += sum(m["cuda_allocator_slack"] for m in planned.values()) + CUDA_UNSPLIT
    bound = shard + largest + slack
    memory = {"shard": shard, "whole": whole, "largest_tensor": largest, "slack": slack, "bound": bound,
              "exact_bound": exact_bound, "live_peak": live.peak, "live_after": live.live,
              "allocations": live.allocations, "largest_allocation": list(live.largest)}
    checks = {}
    if device.type == "cuda":
        stats = torch.cuda.memory_stats()
        memory.update(device_name=torch.cuda.get_device_name(),
                      cuda_peak=torch.cuda.max_memory_allocated() - cuda_before,
                      cuda_after=torch.cuda.memory_allocated() - cuda_before,
                      cuda_requested_peak=stats.get("requested_bytes.all.peak", -1) - requested_before)
        memory["peak"] = memory["cuda_peak"]
        checks["CUDA requested bytes peak <= shard + largest tensor + 64 KiB"] = \
            memory["cuda_requested_peak"] <= exact_bound
    else:
        memory["peak"] = live.peak
    checks["peak <= shard + largest tensor + slack"] = memory["peak"] <= bound
    checks["dispatch-mode peak <= shard + largest tensor + 64 KiB"] = live.peak <= exact_bound
    report = {"rank": rank, "device": str(device), "seconds": seconds, "write_seconds": write_seconds,
              "start": start, "after": after, "sampled": sampler.peak, "memory": memory, "plan": planned,
              "modules": {}}
    for name in LARGE:
        state = handle.state(f"weights:{name}")
        module = getattr(pipe, name)
        report["modules"][name] = {
            "read": state["read_bytes"], "full": state["full_bytes"], "plan": planned[name]["shard"],
            "held": sum(p.numel() * p.element_size() for p in module.parameters()),
            "on_device": sorted({str(p.device) for p in module.parameters()}),
            "tensors": state["tensors"], "sliced": state["sliced_tensors"]}
        checks[f"{name}: read = plan < whole"] = state["read_bytes"] == planned[name]["shard"] < state["full_bytes"]
    report["checks"] = checks
    # The memory figures are gathered and printed before the forward: a forward that fails (or a collective that
    # waits for a failed peer until the group's timeout) cannot take them along.
    reports = gather_json(report)
    if rank == 0:
        _print_loading(reports, world, directory, flux, t5, args)
    later = {"checks": {}}
    if args.forward:
        try:
            later["forward"] = forward_check(pipe, directory, flux, t5, device, rank, args.small)
        except Exception as exc:  # reported with the rest; this rank's peer fails in the same collective
            later["forward"] = {"error": f"{type(exc).__name__}: {exc}"}
        f = later["forward"]
        later["checks"]["forward: ran"] = "error" not in f
        if "error" not in f:
            later["checks"]["forward: finite"] = f["finite"]
            later["checks"]["forward: c10d all_reduce issued"] = f["split"]["collectives"].get("c10d.all_reduce", 0) > 0
            for name, d in f.get("vs_whole", {}).items():
                later["checks"][f"forward: {name} vs whole (relative <= {FORWARD_RELATIVE_TOL})"] = \
                    d["relative"] <= FORWARD_RELATIVE_TOL
    if args.baseline:
        from safetensors.torch import load_file

        kept = []
        for name in LARGE:
            folder = os.path.join(directory, name)
            for f in sorted(os.listdir(folder)):
                if f.endswith(".safetensors"):
                    # Copied out of the memory map: what a rank holds when it loads the whole model.
                    kept.append({k: v.clone() for k, v in load_file(os.path.join(folder, f)).items()})
        later["baseline"] = host_memory()
        del kept
    for r, extra in zip(reports, gather_json(later)):
        r["checks"].update(extra.pop("checks"))
        r.update(extra)
    failed = sorted({f"rank {r['rank']}: {k}" for r in reports for k, ok in r["checks"].items() if not ok})
    if rank == 0:
        _print_later(reports)
        summary = {"world": world, "tp_size": world, "device": args.device, "depth": args.depth,
                   "small": args.small, "torch": torch.__version__, "directory": directory,
                   "seconds_total": time.perf_counter() - started, "failed": failed, "ranks": reports}
        print(json.dumps(summary, sort_keys=True), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


def _print_loading(reports, world, directory, flux, t5, args) -> None:
    print(f"world={world}, tp_size={world}, torch {torch.__version__}, bf16, device {args.device}, files in "
          f"{directory} (written in {reports[0]['write_seconds']:.1f} s; 0 = reused)")
    print(f"FLUX.1-dev-shaped transformer{' (toy widths)' if args.small else ''} with {flux['num_layers']} double + "
          f"{flux['num_single_layers']} single blocks (of 19 + 38); T5-XXL-shaped encoder with {t5['num_layers']} "
          "layers (of 24); both built empty by diffpar.empty_pipeline, loaded by shards with weights_from")
    for r in reports:
        m = r["memory"]
        print(f"\nrank {r['rank']} on {r['device']}: enable_cache {r['seconds']:.2f} s")
        for name, d in r["modules"].items():
            p = r["plan"][name]
            print(f"  {name}: read {gib(d['read'])} of {gib(d['full'])} ({d['read'] / d['full']:.3f}), plan "
                  f"{gib(d['plan'])}, held {gib(d['held'])} on {','.join(d['on_device'])}; {d['sliced']} of "
                  f"{d['tensors']} tensors read as slices; largest tensor part {gib(p['largest_tensor'])} "
                  f"({p['largest_tensor_name']})")
        where = f"{m['device_name']}: max_memory_allocated" if "cuda_peak" in m else "CPU: dispatch-mode live bytes"
        ok = m["peak"] <= m["bound"]
        print(f"  peak device memory while enabling ({where}) {gib(m['peak'])} {'<=' if ok else '>'} shard "
              f"{gib(m['shard'])} + largest tensor {gib(m['largest_tensor'])} + slack {gib(m['slack'])} = "
              f"{gib(m['bound'])}: {'ok' if ok else 'FAILED'}; over the shard by {gib(m['peak'] - m['shard'])}; "
              f"the whole model {gib(m['whole'])} (peak / whole {m['peak'] / m['whole']:.3f})")
        print(f"  dispatch-mode count: peak {gib(m['live_peak'])} over {m['allocations']} allocations, largest "
              f"{gib(m['largest_allocation'][0])}"
              + (f"; CUDA bytes requested: peak {gib(m['cuda_requested_peak'])} (<= {gib(m['exact_bound'])}: "
                 f"{'ok' if m['cuda_requested_peak'] <= m['exact_bound'] else 'FAILED'}), allocated after enabling "
                 f"{gib(m['cuda_after'])}" if "cuda_after" in m else ""))
        s, a = r["start"], r["after"]
        print(f"  host RSS before enabling {gib(s['VmRSS'])} (peak so far {gib(s['peak'])}); after "
              f"{gib(a['VmRSS'])} = anonymous {gib(a['RssAnon'])} + file-backed {gib(a['RssFile'])}; peak "
              f"{gib(a['peak'])}; sampled peaks while enabling: anonymous {gib(r['sampled']['RssAnon'])}, "
              f"file-backed {gib(r['sampled']['RssFile'])} (pages of the memory-mapped files: shared page cache)")
    sys.stdout.flush()


def _print_later(reports) -> None:
    for r in reports:
        print(f"\nrank {r['rank']}:")
        if "forward" in r:
            f = r["forward"]
            if "error" in f:
                print(f"  tensor-parallel forward FAILED: {f['error']}")
            else:
                line = (f"  tensor-parallel forward of both modules {f['seconds']:.2f} s, collectives "
                        f"{f['split']['collectives']}, first attention's heads {f['split']['heads']}")
                for name, d in f.get("vs_whole", {}).items():
                    line += f"; {name} vs whole: max abs diff {d['max_abs_diff']:.3g} of {d['max_abs']:.3g}"
                print(line)
        if "baseline" in r:
            b, a = r["baseline"], r["after"]
            print(f"  baseline, both files loaded whole as well in this process: anonymous RSS "
                  f"{gib(b['RssAnon'])} (+{gib(b['RssAnon'] - a['RssAnon'])} over the shards), peak {gib(b['peak'])}")
        bad = [k for k, v in r["checks"].items() if not v]
        print(f"  checks: {len(r['checks']) - len(bad)} of {len(r['checks'])} passed"
              + (f"; FAILED: {bad}" if bad else ""))


if __name__ == "__main__":
    sys.exit(main())
