"""The demo: a tiny Flux pipeline on N processes, checked against one process.

    torchrun --nproc_per_node=2 -m diffpar.demo [--steps 4] [--size 64] [--out diffpar_demo.png]

Every rank builds the same seeded pipeline (no downloads). Rank 0 first runs it alone, as one process would;
then all ranks run it with the transformer context-parallel, both text encoders tensor-parallel and the VAE
split by rows. Prints the max abs difference, per-rank time and memory, evidence that the work was split (tokens
entering the transformer's first attention and all-to-alls per rank), and saves the image.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import torch
import torch.distributed as dist


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _param_mib(pipe) -> float:
    seen, total = set(), 0
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += p.numel() * p.element_size()
    return total / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="image height and width (multiple of 16)")
    parser.add_argument("--prompt", default="a lighthouse on a cliff at dawn")
    parser.add_argument("--out", default="diffpar_demo.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", message=".*all_gather_tensor.*")  # diffusers' own deprecation notice
    warnings.filterwarnings("ignore", message=".*truncated.*")

    import diffpar
    from diffpar.mesh import ensure_process_group, gather_json
    from diffpar.testing.probes import ULYSSES_COLLECTIVE, SplitProbe, split_problems
    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    torch.set_num_threads(args.threads)
    if not ensure_process_group():
        raise SystemExit("run me with torchrun: torchrun --nproc_per_node=2 -m diffpar.demo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def run(pipe):
        return pipe(
            args.prompt, height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=3.5,
            max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="pt",
        ).images

    # One process: rank 0 alone, as without diffpar.
    reference = torch.empty(1, 3, args.size, args.size)
    single_s = 0.0
    split_reference = None
    if rank == 0:
        ref_pipe = build_tiny_flux_pipeline(heads=4, layers=2, single_layers=2)
        ref_pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            with SplitProbe(ref_pipe.transformer) as probe:
                run(ref_pipe)  # warm-up: first-call costs are not what we compare
            split_reference = probe.summary()
            t0 = time.perf_counter()
            reference = run(ref_pipe)
            single_s = time.perf_counter() - t0
        single_param_mib = _param_mib(ref_pipe)
        del ref_pipe
    dist.broadcast(reference, src=0)

    pipe = build_tiny_flux_pipeline(heads=4, layers=2, single_layers=2)
    pipe.set_progress_bar_config(disable=True)
    full_param_mib = _param_mib(pipe)
    diffpar.enable_cache(
        pipe,
        parallelism_config=diffpar.ParallelismConfig(
            ulysses_size=world,
            parallel_kwargs={"extra_parallel_modules": [pipe.text_encoder, pipe.text_encoder_2, pipe.vae]},
        ),
    )
    with torch.no_grad():
        with SplitProbe(pipe.transformer) as probe:  # the warm-up shows what each rank computed
            run(pipe)
        dist.barrier()
        t0 = time.perf_counter()
        image = run(pipe)
        parallel_s = time.perf_counter() - t0
    diff = (image - reference).abs().max().item()
    stats = torch.tensor([diff, parallel_s, _rss_mib(), _param_mib(pipe)], dtype=torch.float64)
    gathered = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    splits = gather_json(probe.summary(), what="diffpar demo: split report")
    if rank == 0:
        print(f"diffpar demo: tiny FLUX pipeline, {args.size}x{args.size}, {args.steps} steps, {world} processes "
              f"(ulysses_size={world}; text encoders and VAE over all ranks), {args.threads} thread(s) each")
        print(f"  one process : {single_s:8.3f} s   parameters {single_param_mib:7.2f} MiB")
        for r, g in enumerate(gathered):
            print(f"  rank {r}      : {g[1].item():8.3f} s   parameters {g[3].item():7.2f} MiB "
                  f"(of {full_param_mib:.2f})   peak RSS {g[2].item():7.1f} MiB   max|diff| {g[0].item():.2e}")
        worst = max(g[0].item() for g in gathered)
        print(f"  max abs diff vs one process: {worst:.2e} ({'OK' if worst <= 1e-5 else 'TOO LARGE'}, bound 1e-5)")
        full = split_reference["tokens"][0]
        print(f"  split: tokens entering the transformer's first attention at step 1 (one process: {full}), and "
              f"attention calls issuing an all-to-all")
        for r, s in enumerate(splits):
            print(f"  rank {r}      : {s['tokens'][0]} of {full} tokens (image {s['image_tokens'][0]} + text "
                  f"{s['text_tokens'][0]}), all-to-all in {s['attention_calls_with'].get(ULYSSES_COLLECTIVE, 0)} of "
                  f"{s['attention_calls']} attention calls")
        problems = split_problems(split_reference, splits, {"ulysses_size": world})
        print(f"  work split over {world} ranks: {'OK' if not problems else 'NO: ' + '; '.join(problems)}")
        print(f"  speed ratio (one process / {world} ranks): {single_s / max(g[1].item() for g in gathered):.2f}x")
        try:
            from PIL import Image

            array = (image[0].clamp(0, 1).permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(array).save(args.out)
            print(f"  image saved to {os.path.abspath(args.out)}")
        except ImportError:
            print("  (Pillow not installed: image not saved)")
        ok = worst <= 1e-5 and not problems
    else:
        ok = True
    return 0 if ok else 1


if __name__ == "__main__":
    from diffpar.mesh import end_process

    end_process(main())  # exit code only: no C++ teardown that could abort a correct run
