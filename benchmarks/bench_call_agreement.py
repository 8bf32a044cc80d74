"""What the per-call agreement costs: the exchange at the start of every pipeline call, against a denoising step.

    torchrun --nproc_per_node=2 benchmarks/bench_call_agreement.py [--size 64] [--steps 4] [--rounds 5]

Runs the demo's tiny FLUX pipeline (ulysses 2, VAE split) with `check_every_call=True` and `False`. Reports:
- the time per denoising step (whole calls, interleaved round by round; the first round warms up);
- collectives per call: those of the per-call exchange (from the call's start to the pipeline's first line, its
  `check_inputs`) and those of the whole call, counted by wrapping torch.distributed's functions (and the
  functional collectives diffusers' Ulysses attention uses);
- the whole per-call exchange's time (describe the arguments, fingerprint them, digest the random states, the
  all-gather, and the random states' broadcast when they differ), timed from the call's start to `check_inputs`,
  which raises to end the call there: for a text prompt and for precomputed prompt embeddings (their checksums
  are part of the description), with the same seed on every rank (the common case: no broadcast) and with each
  rank's own seed (a broadcast);
- the marginal cost of check_every_call=True (describing the arguments and fingerprinting them), timed alone and
  as the difference of the exchanges with and without it;
each as a % of a denoising step, with the load average at the start and the end (the exchange's cost is mostly
scheduling latency: report the load with it).
"""
from __future__ import annotations

import argparse
import os
import warnings
import statistics
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

    def _wrap(self, module, name, label):
        original = getattr(module, name, None)
        if original is None:
            return

        def counted(*args, **kwargs):
            self.counts[label] = self.counts.get(label, 0) + 1
            return original(*args, **kwargs)

        self._originals.append((module, name, original))
        setattr(module, name, counted)

    def __enter__(self):
        for name in _C10D:
            self._wrap(dist, name, name)
        for name in _FUNCOL:
            self._wrap(funcol, name, f"funcol.{name}")
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()

    def snapshot(self) -> dict:
        return dict(self.counts)


class _EndOfExchange(Exception):
    """Raised from the pipeline's first line: the call ends right after diffpar's per-call exchange."""


def time_exchanges(cases: dict, n: int) -> dict:
    """Per case (pipe, call kwargs, seed of a rank): the median time of the per-call exchange alone, over n calls
    ended at `check_inputs`, and its collectives per call. The cases take turns call by call, so a change of
    load during the run weighs on each alike."""
    reached = []

    def first_line(*args, **kw):
        reached.append(time.perf_counter())
        raise _EndOfExchange

    samples = {key: [] for key in cases}
    counts = {key: {} for key in cases}
    for pipe, _, _ in cases.values():
        pipe.check_inputs = first_line
    try:
        for i in range(n + 1):  # the first round makes the global random states equal: not counted
            for key, (pipe, kwargs, seed_of_rank) in cases.items():
                dist.barrier()
                generator = torch.Generator().manual_seed(seed_of_rank(dist.get_rank()))
                with CollectiveCounter() as counter:
                    started = time.perf_counter()
                    try:
                        pipe(**kwargs, generator=generator)
                    except _EndOfExchange:
                        pass
                if i == 0:
                    continue
                samples[key].append(reached[-1] - started)
                for name, c in counter.counts.items():
                    counts[key][name] = counts[key].get(name, 0) + c / n
    finally:
        for pipe, _, _ in cases.values():
            vars(pipe).pop("check_inputs", None)
    return {key: (statistics.median(samples[key]), counts[key]) for key in cases}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--exchanges", type=int, default=300, help="per-call exchanges timed alone, per case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor's deprecation, once per call

    import diffpar
    from diffpar.engines.call_agreement import describe_call
    from diffpar.mesh import ensure_process_group, fingerprint
    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    ensure_process_group()
    load_at_start = os.getloadavg()
    call = dict(prompt="a lighthouse on a cliff at dawn", height=args.size, width=args.size,
                num_inference_steps=args.steps, max_sequence_length=16, guidance_scale=3.5, output_type="pt")
    pipes = {}
    for check in (True, False):
        pipe = build_tiny_flux_pipeline()
        pipe.set_progress_bar_config(disable=True)
        diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
            ulysses_size=2, check_every_call=check, extra_parallel_modules=[pipe.vae]))
        pipes[check] = pipe

    times = {True: [], False: []}
    whole_call_counts = {}
    with torch.no_grad():
        for _ in range(args.rounds + 1):  # the first round warms up
            for check, pipe in pipes.items():
                dist.barrier()
                with CollectiveCounter() as counter:
                    started = time.perf_counter()
                    pipe(**call, generator=torch.Generator().manual_seed(0))
                    times[check].append(time.perf_counter() - started)
                whole_call_counts[check] = counter.snapshot()
        prompt_embeds, pooled, _ = pipes[False].encode_prompt(call["prompt"], None, max_sequence_length=16)
    embeds_call = dict(call, prompt=None, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)

    cases = {}
    for check in (True, False):
        for label, kwargs in (("prompt", call), ("prompt embeddings", embeds_call)):
            for seeds, seed_of_rank in (("same seed", lambda r: 0), ("seed per rank", lambda r: r)):
                cases[(check, label, seeds)] = (pipes[check], kwargs, seed_of_rank)
    with torch.no_grad():
        exchanges = time_exchanges(cases, args.exchanges)

    # check_every_call's own work, timed alone (the embeddings call): describe the arguments, fingerprint them.
    bound_call = pipes[True].__call__
    parts = {"describe": [], "fingerprint": []}
    for _ in range(args.exchanges):
        started = time.perf_counter()
        description = {"arguments": describe_call(bound_call, (), dict(embeds_call))}
        parts["describe"].append(time.perf_counter() - started)
        started = time.perf_counter()
        fingerprint(description)
        parts["fingerprint"].append(time.perf_counter() - started)
    load_at_end = os.getloadavg()

    with_check = statistics.median(times[True][1:])
    without = statistics.median(times[False][1:])
    per_step = without / args.steps

    def pct(seconds: float) -> str:
        return f"{seconds * 1e3:7.3f} ms = {100 * seconds / per_step:5.2f}% of a step"

    def shown(counts: dict) -> str:
        return ", ".join(f"{k} {v:g}" for k, v in sorted(counts.items())) or "none"

    if dist.get_rank() == 0:
        print(f"tiny FLUX pipeline {args.size}x{args.size}, {args.steps} steps, ulysses 2 + VAE split, 2 ranks x 1 "
              f"thread, median of {args.rounds} rounds")
        print(f"  pipeline call, check_every_call=False : {without * 1e3:8.1f} ms ({per_step * 1e3:.2f} ms per step)")
        print(f"  pipeline call, check_every_call=True  : {with_check * 1e3:8.1f} ms")
        for check in (True, False):
            print(f"  collectives in one whole call, check_every_call={check}: {shown(whole_call_counts[check])}")
        print(f"  the per-call exchange (call start -> pipeline's first line), median of {args.exchanges}:")
        for (check, label, seeds), (seconds, counts) in exchanges.items():
            print(f"    check_every_call={check!s:5} {label:17s} {seeds:13s}: {pct(seconds)}; collectives: "
                  f"{shown(counts)}")
        for label in ("prompt", "prompt embeddings"):
            marginal = exchanges[(True, label, "same seed")][0] - exchanges[(False, label, "same seed")][0]
            print(f"  marginal cost of check_every_call=True, {label:17s} (exchange True - False): {pct(marginal)}")
        alone = statistics.median(parts["describe"]) + statistics.median(parts["fingerprint"])
        print(f"  check_every_call=True's own work, timed alone (embeddings call): describe "
              f"{statistics.median(parts['describe']) * 1e3:.3f} ms + fingerprint "
              f"{statistics.median(parts['fingerprint']) * 1e3:.3f} ms = {pct(alone)}")
        loads = " -> ".join(f"{a:.2f} {b:.2f} {c:.2f}" for a, b, c in (load_at_start, load_at_end))
        print(f"  load average (1, 5, 15 min), start -> end: {loads}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
