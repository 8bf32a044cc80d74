"""Sharded loading (`weights_from`): bytes each rank materialises and its host memory, vs the whole model.

    torchrun --nproc_per_node=2 benchmarks/bench_sharded_loading.py [--dir /tmp/diffpar_sharded] [--baseline]

Real-shaped layers, scaled in depth only (the full models are 24 GB and 9.5 GB of bf16 files, which this
benchmark cannot write): a FLUX.1-dev-shaped transformer (24 heads of 128, joint_attention_dim 4096, in_channels
64, guidance) with 1 double-stream and 1 single-stream block (of 19 and 38), and a T5-XXL-shaped encoder (d_model
4096, 64 heads of 64, d_ff 10240 gated-gelu, vocabulary 32128) with 2 layers (of 24), in bf16. Rank 0 writes them
once in a pipeline directory with save_pretrained (safetensors; the other components tiny); every rank then
builds the pipeline with `diffpar.empty_pipeline(dir, ["transformer", "text_encoder_2"])` (both on the meta
device) and enables tp_size=world with the T5 in extra_parallel_modules and `weights_from="auto"`. Per rank it prints: the bytes read from the files (the slices copied) and
held afterwards vs the whole module, and host memory (peak RSS from resource.getrusage, and the current
anonymous / file-backed RSS from /proc/self/status: the file-backed part is the page cache of the memory-mapped
files, shared by every rank on the host; a thread samples both while enabling). `--baseline` then loads both files whole in each process (what tensor
parallelism needed before) and prints that peak too. With CUDA it also prints each rank's device memory
(allocated after enabling, and the peak while enabling); on a one-GPU machine the ranks share the GPU over gloo
(loading issues no CUDA collective).
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist

import diffpar
from diffpar.mesh import ensure_process_group, gather_json

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64,
              feed_forward_proj="gated-gelu", dropout_rate=0.0, relative_attention_num_buckets=32,
              relative_attention_max_distance=128, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _empty(names=("transformer", "text_encoder_2")):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    built = {}
    with init_empty_weights():
        if "transformer" in names:
            built["transformer"] = FluxTransformer2DModel.from_config(FLUX_DEV).to(torch.bfloat16).eval()
        if "text_encoder_2" in names:
            built["text_encoder_2"] = T5EncoderModel._from_config(T5Config(**T5_XXL), dtype=torch.bfloat16).eval()
    return built


def write_files(directory: str) -> None:
    """A saved pipeline directory (model_index.json + subfolders, as save_pretrained writes it): the two large
    modules as zero-filled bf16 weights of the real shapes (values do not matter for what is measured), the rest
    (scheduler, VAE, CLIP, tokenizers: not measured) tiny."""
    if os.path.isfile(os.path.join(directory, "model_index.json")):
        return
    from diffusers import FluxPipeline

    from diffpar.testing import tiny_pipelines

    large = _empty()
    for module in large.values():
        module.to_empty(device="cpu")
        if hasattr(module, "tie_weights"):
            module.tie_weights()  # T5's embedding is saved once, as from_pretrained would
        with torch.no_grad():
            for p in module.parameters():
                p.zero_()
    small = tiny_pipelines.build_tiny_flux_pipeline().components
    FluxPipeline(**{**small, **large}).save_pretrained(directory)


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


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/diffpar_sharded_loading_pipeline")
    parser.add_argument("--baseline", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    local_rank, world_env = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available() and torch.cuda.device_count() < world_env:
        # Several ranks on one GPU (a lent one-GPU machine): NCCL refuses a duplicate GPU, and nothing here needs
        # a CUDA collective (loading issues none), so gloo alone, every rank on the GPUs there are.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("gloo")
    if not ensure_process_group():
        raise SystemExit("launch with: torchrun --nproc_per_node=2 benchmarks/bench_sharded_loading.py")
    world, rank = dist.get_world_size(), dist.get_rank()
    if rank == 0:
        os.makedirs(args.dir, exist_ok=True)
        write_files(args.dir)
    dist.barrier()

    start = host_memory()
    # The recipe of docs/loading.md: the large modules built empty from their saved configs, the rest loaded.
    pipe = diffpar.empty_pipeline(args.dir, ["transformer", "text_encoder_2"], torch_dtype=torch.bfloat16)
    config = diffpar.ParallelismConfig(tp_size=world, extra_parallel_modules=["text_encoder_2"], weights_from="auto")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the peak while enabling, per rank
    began = time.perf_counter()
    with PeakSampler() as sampler:
        handle = diffpar.enable_cache(pipe, parallelism_config=config)
    seconds = time.perf_counter() - began
    after = host_memory()
    report = {"rank": rank, "seconds": seconds, "start": start, "after": after, "sampled": sampler.peak,
              "modules": {}}
    if torch.cuda.is_available():
        report["cuda"] = {"device": torch.cuda.get_device_name(), "allocated": torch.cuda.memory_allocated(),
                          "peak": torch.cuda.max_memory_allocated()}
    for name in ("transformer", "text_encoder_2"):
        state = handle.state(f"weights:{name}")
        module = getattr(pipe, name)
        report["modules"][name] = {
            "read": state["read_bytes"], "full": state["full_bytes"],
            "held": sum(p.numel() * p.element_size() for p in module.parameters()),
            "tensors": state["tensors"], "sliced": state["sliced_tensors"]}
    if args.baseline:
        from safetensors.torch import load_file

        whole = []
        for name in ("transformer", "text_encoder_2"):
            folder = os.path.join(args.dir, name)
            for f in sorted(os.listdir(folder)):
                if f.endswith(".safetensors"):
                    # Copied out of the memory map: what a rank holds when it loads the whole model.
                    whole.append({k: v.clone() for k, v in load_file(os.path.join(folder, f)).items()})
        report["baseline"] = host_memory()
        del whole
    reports = gather_json(report)
    if rank == 0:
        print(f"world={world}, tp_size={world}, torch {torch.__version__}, bf16, files in {args.dir}")
        print("FLUX.1-dev-shaped transformer with 1 double + 1 single block (of 19 + 38); T5-XXL-shaped encoder "
              "with 2 layers (of 24); both built empty by diffpar.empty_pipeline, loaded with weights_from=\"auto\"")
        for r in reports:
            print(f"\nrank {r['rank']}: enable_cache {r['seconds']:.2f} s")
            for name, m in r["modules"].items():
                print(f"  {name}: read {gib(m['read'])} of {gib(m['full'])} ({m['read'] / m['full']:.3f}), held "
                      f"{gib(m['held'])}; {m['sliced']} of {m['tensors']} tensors read as slices")
            total_read = sum(m["read"] for m in r["modules"].values())
            total_full = sum(m["full"] for m in r["modules"].values())
            print(f"  both: read {gib(total_read)} of {gib(total_full)} ({total_read / total_full:.3f})")
            s, a = r["start"], r["after"]
            print(f"  host RSS before enabling {gib(s['VmRSS'])} (peak so far {gib(s['peak'])}); after "
                  f"{gib(a['VmRSS'])} = anonymous {gib(a['RssAnon'])} + file-backed {gib(a['RssFile'])}; peak "
                  f"{gib(a['peak'])}; sampled peaks while enabling: anonymous {gib(r['sampled']['RssAnon'])}, "
                  f"file-backed {gib(r['sampled']['RssFile'])} (pages of the memory-mapped files: shared page cache)")
            if "cuda" in r:  # per rank: what sharded loading put on this rank's GPU
                c = r["cuda"]
                print(f"  {c['device']}: allocated by this rank after enabling {gib(c['allocated'])}, peak while "
                      f"enabling {gib(c['peak'])} (the whole model: {gib(total_full)})")
            if "baseline" in r:
                b = r["baseline"]
                print(f"  baseline, both files loaded whole as well in this process: anonymous RSS "
                      f"{gib(b['RssAnon'])} (+{gib(b['RssAnon'] - a['RssAnon'])} over the shards), peak {gib(b['peak'])}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
