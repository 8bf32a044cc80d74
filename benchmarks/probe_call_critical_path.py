"""Where the per-call agreement lands on the call's critical path, against no agreement at all.

    torchrun --nproc_per_node=2 benchmarks/probe_call_critical_path.py [--calls 80]

The demo's tiny FLUX pipeline (64x64, 4 steps, ulysses 2 + VAE split), called with a text prompt and the same seed
on every rank, in four cases taking turns call by call (so a change of load weighs on each alike):
- default: the agreement as shipped;
- none: the call checker idle and prepare_latents unwrapped (no exchange, no broadcast; right here only because
  every rank passes the same seed);
- bare all-reduce, 80 B / 20 KB: "none" plus one all-reduce of that size issued on the agreement's group at the
  call's start and waited for after it: what gloo's own threads cost the call, with no describing at all.
For each, the median time from the call's start to: check_inputs (the pipeline's first line), the end of
encode_prompt (local work only: no collective before it here), the end of the first denoising step, the end of
the call; printed as the difference from "none". Differences under about 1.5 ms are within this 2-core host's noise
(docs/benchmarks.md); the calling thread's own time in the agreement is bench_call_agreement.py's measure.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=80)
    parser.add_argument("--pin", action="store_true",
                        help="pin each rank (and the threads it starts: gloo's) to a CPU of its own")
    args = parser.parse_args()
    if args.pin:  # before the process group exists, so gloo's threads inherit it
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[int(os.environ.get("LOCAL_RANK", 0)) % len(cpus)]})
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)

    import diffpar
    from diffpar import mesh as mesh_lib
    from diffpar.mesh import ensure_process_group
    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    ensure_process_group()
    load_at_start = os.getloadavg()
    call = dict(prompt="a lighthouse on a cliff at dawn", height=64, width=64, num_inference_steps=4,
                max_sequence_length=16, guidance_scale=3.5, output_type="pt")
    pipe = build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
        ulysses_size=2, extra_parallel_modules=[pipe.vae]))
    checker = handle.state("call_checker")
    group = mesh_lib.world_group(checker.timeout_s)
    marks: dict[str, float] = {}
    check_inputs, encode_prompt = pipe.check_inputs, pipe.encode_prompt

    def timed_check_inputs(*a, **k):
        marks.setdefault("check_inputs", time.perf_counter())
        return check_inputs(*a, **k)

    def timed_encode_prompt(*a, **k):
        out = encode_prompt(*a, **k)
        marks.setdefault("encode_prompt end", time.perf_counter())
        return out

    pipe.check_inputs, pipe.encode_prompt = timed_check_inputs, timed_encode_prompt
    def first_step_end(module, inputs, output) -> None:  # returns None: the output stays the transformer's
        marks.setdefault("first step end", time.perf_counter())

    pipe.transformer.register_forward_hook(first_step_end)
    sizes = {"bare all-reduce 80 B": 10, "bare all-reduce 20 KB": 2538}
    cases = ["default", "none", *sizes]
    times: dict[str, dict[str, list[float]]] = {case: {} for case in cases}
    agreement = []
    with torch.no_grad():
        for i in range(args.calls + 2):  # two rounds warm up
            for case in cases[i % len(cases):] + cases[:i % len(cases)]:
                idle = case != "default"
                unwrapped = vars(pipe).pop("prepare_latents") if idle else None
                streams, checker.random_streams = checker.random_streams, (None if idle else checker.random_streams)
                checker.check_arguments = not idle
                dist.barrier()
                marks.clear()
                started = time.perf_counter()
                work = group.allreduce([torch.zeros(sizes[case], dtype=torch.int64)]) if case in sizes else None
                pipe(**call, generator=torch.Generator().manual_seed(0))
                marks["call end"] = time.perf_counter()
                if work is not None:
                    work.wait()
                checker.random_streams, checker.check_arguments = streams, True
                if unwrapped is not None:
                    vars(pipe)["prepare_latents"] = unwrapped
                if i < 2:
                    continue
                if case == "default":
                    agreement.append(checker.last_seconds)
                for name, at in marks.items():
                    times[case].setdefault(name, []).append(at - started)
    if dist.get_rank() == 0:
        print(f"tiny FLUX 64x64, 4 steps, ulysses 2 + VAE split{', each rank pinned to a CPU' if args.pin else ''}, "
              f"median of {args.calls} calls per case; the calling "
              f"thread's time in the agreement: {statistics.median(agreement) * 1e6:.0f} us")
        for name in times["none"]:
            base = statistics.median(times["none"][name])
            shown = "  ".join(f"{case} {(statistics.median(times[case][name]) - base) * 1e6:+7.0f} us"
                              for case in cases if case != "none")
            print(f"  call start -> {name:18s} none {base * 1e3:8.3f} ms; {shown}")
        loads = " -> ".join(f"{a:.2f} {b:.2f} {c:.2f}" for a, b, c in (load_at_start, os.getloadavg()))
        print(f"  load average (1, 5, 15 min), start -> end: {loads}")
    handle.detach()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
