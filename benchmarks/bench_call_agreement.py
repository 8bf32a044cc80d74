"""What the per-call agreement costs: the exchange at the start of every pipeline call, against a denoising step.

    torchrun --nproc_per_node=2 benchmarks/bench_call_agreement.py [--size 64] [--steps 4] [--calls 40]

Runs the demo's tiny FLUX pipeline (ulysses 2, VAE split). The exchange (one sum all-reduce of every rank's row:
the arguments' fingerprint and the random states themselves, so a seed per rank needs no broadcast) is
issued at the call's start and settled where the call first needs the ranks agreed (its first collective, parallel
module or prepare_latents), so its round trip overlaps the call's tokenizing and text encoding. Reports, per case
(text prompt or precomputed embeddings; the same seed on every rank or a seed per rank), over whole calls taking
turns case by case (so a change of load weighs on each alike):
- the agreement's cost to the call: the calling thread's time in it (describing the arguments, issuing the
  exchange, and the wait left at the settle point, plus the broadcast when the states differ), median over calls,
  as a % of a denoising step; with the overlap (the default) and without it (`CallChecker.overlap = False`: waited
  for at the call's start, the previous sessions' behaviour);
- the whole call's median time for each, and with check_every_call=False;
- collectives per call, counted by wrapping torch.distributed's functions (and the functional collectives
  diffusers' Ulysses attention uses);
- check_every_call=True's own work timed alone (describe the arguments, fingerprint them);
- the same pipeline with its checker idle (no exchange; prepare_latents' outputs broadcast, as every call did
  before the per-call agreement): its whole call and collectives;
- the time from the call's start to the end of its first denoising step (the transformer's first forward returns,
  where every rank has met the others in any case): default, no agreement at all (checker idle and prepare_latents
  unwrapped: no exchange, no broadcast; right here only because every rank passes the same seed), and as before
  the agreement. A stricter measure of what the agreement adds to the critical path than the calling thread's time
  (it also holds the exchange's gloo work on the shared cores and waiting on the slower rank one more time);
- the CPU time of the process's other threads per call (gloo's: its worker and TCP loop threads, from
  /proc/self/task/*/schedstat, Linux only), default against no agreement at all: what the exchange costs beyond the
  calling thread. On a host whose cores are all busy with ranks (this 2-core one), that time is taken from the
  call's own work; with cores to spare (a GPU server) it is not;
with the load average at the start and the end (the exchange's cost is mostly scheduling latency).
"""
from __future__ import annotations

import argparse
import os
import warnings
import statistics
import threading
import time

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

_C10D = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "all_to_all_single", "all_to_all",
         "reduce_scatter_tensor", "send", "recv", "batch_isend_irecv", "barrier")  # isend/irecv: P2POp checks their identity
_FUNCOL = ("all_to_all_single", "all_gather_tensor", "all_reduce", "reduce_scatter_tensor")


class CollectiveCounter:
    """Counts calls of torch.distributed's collectives (and the functional ones) while entered."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self._originals: list = []
        self._inside = 0

    def _wrap(self, module, name, label):
        original = getattr(module, name, None)
        if original is None:
            return

        def counted(*args, **kwargs):
            self.counts[label] = self.counts.get(label, 0) + 1
            self._inside += 1  # the group method a dist-level collective calls is not a second one
            try:
                return original(*args, **kwargs)
            finally:
                self._inside -= 1

        self._originals.append((module, name, original))
        setattr(module, name, counted)

    def __enter__(self):
        for name in _C10D:
            self._wrap(dist, name, name)
        # The call agreement issues its exchange on the group itself (diffpar.compat.collectives), below `dist`.
        from diffpar.testing.probes import group_exchanges_counted

        self._group_counting = group_exchanges_counted(self._count_group_exchange)
        self._group_counting.__enter__()
        for name in _FUNCOL:
            self._wrap(funcol, name, f"funcol.{name}")
        return self

    def _count_group_exchange(self):
        if self._inside:
            return
        label = "the exchange (group all_reduce)"
        self.counts[label] = self.counts.get(label, 0) + 1

    def __exit__(self, *exc):
        self._group_counting.__exit__(*exc)
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()

    def snapshot(self) -> dict:
        return dict(self.counts)


_FIRST_STEP: list = []


def other_threads_cpu_ns() -> int | None:
    """CPU time so far of every thread of this process but the calling one (Linux's schedstat, in ns); None where
    /proc has no such file."""
    total, me = 0, str(threading.get_native_id())
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        if tid == me:
            continue
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            continue
    return total


def _note_first_step(module, args, output):
    if not _FIRST_STEP:
        _FIRST_STEP.append(time.perf_counter())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--calls", type=int, default=40, help="timed whole calls per case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor's deprecation, once per call

    import diffpar
    from diffpar.compat.collectives import issue_all_reduce_sum
    from diffpar.engines.call_agreement import arguments_fingerprint, call_items
    from diffpar.mesh import ensure_process_group
    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    ensure_process_group()
    load_at_start = os.getloadavg()
    call = dict(prompt="a lighthouse on a cliff at dawn", height=args.size, width=args.size,
                num_inference_steps=args.steps, max_sequence_length=16, guidance_scale=3.5, output_type="pt")
    pipes = {}
    for check in (True, False):
        pipe = build_tiny_flux_pipeline()
        pipe.set_progress_bar_config(disable=True)
        handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
            ulysses_size=2, check_every_call=check, extra_parallel_modules=[pipe.vae]))
        pipes[check] = (pipe, handle.state("call_checker"))
        # When the call's first denoising step ends: the transformer's first forward in the call returns (every rank
        # has met the others by then, with the agreement or without).
        pipe.transformer.register_forward_hook(_note_first_step)
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipes[False][0].encode_prompt(call["prompt"], None, max_sequence_length=16)
    embeds_call = dict(call, prompt=None, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)

    # (check_every_call, overlap, arguments, seeds) -> (pipe, checker, call kwargs, seed of a rank)
    cases = {}
    for label, kwargs in (("prompt", call), ("prompt embeddings", embeds_call)):
        for seeds, seed_of_rank in (("same seed", lambda r: 0), ("seed per rank", lambda r: r)):
            for overlap in (True, False):
                cases[(True, overlap, label, seeds)] = (*pipes[True], kwargs, seed_of_rank)
    cases[(False, True, "prompt", "same seed")] = (*pipes[False], call, lambda r: 0)
    # The same pipeline as the default case with its call checker idle: no exchange, and prepare_latents' outputs
    # broadcast (what every call did before the per-call agreement). Same object, so the same memory layout.
    cases[None] = (*pipes[True], call, lambda r: 0)
    # No agreement at all: the checker idle and prepare_latents unwrapped (no broadcast either; the same seed on every
    # rank, so the image is still right here): the baseline for what the agreement itself adds.
    cases["none"] = (*pipes[True], call, lambda r: 0)
    agreement = {key: [] for key in cases}
    whole = {key: [] for key in cases}
    to_first_step = {key: [] for key in cases}
    counts = {key: {} for key in cases}
    threads_cpu = {key: [] for key in cases}
    with torch.no_grad():
        for i in range(args.calls + 1):  # the first round warms up (and makes the global random states equal)
            for key, (pipe, checker, kwargs, seed_of_rank) in cases.items():
                idle = key is None or key == "none"
                if not idle:
                    checker.overlap = key[1]
                patched_prepare = vars(pipe).pop("prepare_latents") if key == "none" else None
                streams, checker.random_streams = checker.random_streams, (None if idle else checker.random_streams)
                checker.check_arguments = not idle
                dist.barrier()
                generator = torch.Generator().manual_seed(seed_of_rank(dist.get_rank()))
                with CollectiveCounter() as counter:
                    _FIRST_STEP.clear()
                    cpu_before = other_threads_cpu_ns()
                    started = time.perf_counter()
                    pipe(**kwargs, generator=generator)
                    elapsed = time.perf_counter() - started
                    cpu_after = other_threads_cpu_ns()
                checker.random_streams, checker.check_arguments = streams, True
                if patched_prepare is not None:
                    vars(pipe)["prepare_latents"] = patched_prepare
                if i == 0:
                    continue
                whole[key].append(elapsed)
                to_first_step[key].append(_FIRST_STEP[0] - started)
                if cpu_before is not None and cpu_after is not None:
                    threads_cpu[key].append((cpu_after - cpu_before) / 1e9)
                agreement[key].append(0.0 if idle else checker.last_seconds)
                for name, c in counter.counts.items():
                    counts[key][name] = counts[key].get(name, 0) + c / args.calls

    # check_every_call's own work, timed alone (the embeddings call): bind the arguments, fingerprint them.
    bound_call = pipes[True][0].__call__
    parts = {"bind": [], "fingerprint": []}
    for _ in range(args.calls * 5):
        started = time.perf_counter()
        items = call_items(bound_call, (), dict(embeds_call))
        parts["bind"].append(time.perf_counter() - started)
        started = time.perf_counter()
        arguments_fingerprint(items)
        parts["fingerprint"].append(time.perf_counter() - started)
    # The floor: an exchange of the same size alone (a table of every rank's row, summed), issued, then 2 ms of
    # local work (what the overlap hides its round trip behind), then waited for. The issue is what the calling
    # thread pays for waking gloo's worker thread.
    group = dist.group.WORLD
    issue_s, wait_s = [], []
    work_matrix = torch.randn(64, 64)
    table = pipes[True][1]._buffers.rows
    for _ in range(args.calls * 5):
        out = torch.zeros_like(table)
        started = time.perf_counter()
        work = issue_all_reduce_sum(out, group)
        issued = time.perf_counter()
        until = issued + 0.002
        while time.perf_counter() < until:
            work_matrix = torch.tanh(work_matrix @ work_matrix)
        waited = time.perf_counter()
        work.wait()
        issue_s.append(issued - started)
        wait_s.append(time.perf_counter() - waited)
    load_at_end = os.getloadavg()

    without = statistics.median(whole[(False, True, "prompt", "same seed")])
    per_step = without / args.steps

    def pct(seconds: float) -> str:
        return f"{seconds * 1e3:7.3f} ms = {100 * seconds / per_step:5.2f}% of a step"

    def shown(counts: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items())) or "none"

    if dist.get_rank() == 0:
        print(f"tiny FLUX pipeline {args.size}x{args.size}, {args.steps} steps, ulysses 2 + VAE split, 2 ranks x 1 "
              f"thread, median of {args.calls} calls per case")
        print(f"  pipeline call, check_every_call=False : {without * 1e3:8.1f} ms ({per_step * 1e3:.2f} ms per step)")
        print("  the agreement's cost to the call (calling thread's time in it), and the whole call:")
        for key in cases:
            if key is None or key == "none":
                continue
            check, overlap, label, seeds = key
            print(f"    check_every_call={check!s:5} overlap={overlap!s:5} {label:17s} {seeds:13s}: "
                  f"{pct(statistics.median(agreement[key]))}; whole call "
                  f"{statistics.median(whole[key]) * 1e3:7.1f} ms; collectives: {shown(counts[key])}")
        for label in ("prompt", "prompt embeddings"):
            for seeds in ("same seed", "seed per rank"):
                saved = (statistics.median(agreement[(True, False, label, seeds)])
                         - statistics.median(agreement[(True, True, label, seeds)]))
                print(f"  overlap saves, {label:17s} {seeds:13s}: {pct(saved)}")
        none = None
        print(f"  as before the agreement (the same pipeline, its checker idle: no exchange, the latents broadcast): "
              f"whole call {statistics.median(whole[none]) * 1e3:.1f} ms; collectives: {shown(counts[none])}")
        default = (True, True, "prompt", "same seed")
        first = {key: statistics.median(values) for key, values in to_first_step.items()}
        print(f"  the call's start to the end of its first denoising step (the transformer's first forward), median: default "
              f"{first[default] * 1e3:.3f} ms; no agreement at all (checker idle, no broadcast) "
              f"{first['none'] * 1e3:.3f} ms; as before the agreement (the latents broadcast) {first[none] * 1e3:.3f}"
              f" ms. The agreement adds {pct(first[default] - first['none'])} there (against no agreement: the cold"
              f" caches at a call's start are paid by whatever runs first), {pct(first[default] - first[none])} "
              "against before it")
        print(f"  whole call, no agreement at all: {statistics.median(whole['none']) * 1e3:.1f} ms; collectives: "
              f"{shown(counts['none'])}")
        if threads_cpu[default] and threads_cpu["none"]:
            spent = statistics.median(threads_cpu[default]) - statistics.median(threads_cpu["none"])
            print(f"  CPU time of the process's other threads (gloo's) per call, median: default "
                  f"{statistics.median(threads_cpu[default]) * 1e3:.2f} ms, no agreement at all "
                  f"{statistics.median(threads_cpu['none']) * 1e3:.2f} ms, as before the agreement "
                  f"{statistics.median(threads_cpu[none]) * 1e3:.2f} ms: the exchange adds {pct(spent)} of CPU "
                  "beyond the calling thread (off the call's path where cores are spare)")
        marginal = (statistics.median(agreement[(True, True, "prompt", "same seed")])
                    - statistics.median(agreement[(False, True, "prompt", "same seed")]))
        print(f"  the argument check's marginal cost (check_every_call True - False, prompt, same seed): {pct(marginal)}")
        alone = statistics.median(parts["bind"]) + statistics.median(parts["fingerprint"])
        print(f"  check_every_call=True's own work, timed alone (embeddings call): bind the arguments "
              f"{statistics.median(parts['bind']) * 1e3:.3f} ms + fingerprint them "
              f"{statistics.median(parts['fingerprint']) * 1e3:.3f} ms = {pct(alone)}")
        print(f"  the exchange alone ({table.numel() * 8} bytes), overlapped with 2 ms of local work: issue {statistics.median(issue_s) * 1e3:.3f} ms"
              f" + wait left {statistics.median(wait_s) * 1e3:.3f} ms = {pct(statistics.median(issue_s) + statistics.median(wait_s))}")
        loads = " -> ".join(f"{a:.2f} {b:.2f} {c:.2f}" for a, b, c in (load_at_start, load_at_end))
        print(f"  load average (1, 5, 15 min), start -> end: {loads}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
