"""Rank-side checks for torch.compile on top of a parallel model or pipeline (docs/compile.md).

Every compile goes through `RecordingBackend`: it counts the graphs dynamo hands to the compiler (a recompile is
one more graph) and lists the collectives inside them, which proves that the compiled code itself communicates
(the work is split inside the graph, not around it), then passes the graph on to the real backend.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_pipelines, tiny_transformers
from diffpar.testing.probes import SplitProbe

# Functional collective ops as they appear in a dynamo graph (torch.ops._c10d_functional.<name>).
COLLECTIVE_OPS = ("all_to_all_single", "all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor",
                  "broadcast", "permute_tensor")


class RecordingBackend:
    """A dynamo backend that records each graph it is given (count, collectives, input shapes) and compiles it
    with `backend` ("aot_eager", "inductor", ...)."""

    def __init__(self, backend: str):
        self.backend = backend
        self.graphs = 0
        self.collectives: dict[str, int] = {}

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        for node in gm.graph.nodes:
            name = str(node.target)
            for op in COLLECTIVE_OPS:
                if node.op == "call_function" and f"_c10d_functional.{op}" in name:
                    self.collectives[op] = self.collectives.get(op, 0) + 1
        from torch._dynamo import lookup_backend

        return lookup_backend(self.backend)(gm, example_inputs)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _compile(model, mode: str, backend, fullgraph: bool):
    if mode == "regional":  # diffusers' regional compile: each repeated block class compiled once
        model.compile_repeated_blocks(fullgraph=fullgraph, backend=backend)
        return model
    return torch.compile(model, backend=backend, fullgraph=fullgraph)


def _step_inputs(make_inputs, seq: int, text: int):
    """Three calls of the same shapes: a first step, a later step (another timestep), and a new call (new noise
    and prompt, first timestep again). None of them may compile anything new."""
    first = make_inputs(seq=seq, text=text, seed=1)
    later = dict(copy.deepcopy(first), timestep=first["timestep"] * 0.5)
    new_call = make_inputs(seq=seq, text=text, seed=2)
    return [first, later, new_call]


def compile_equivalence(model_name: str, config: dict, mode: str = "regional", backend: str = "aot_eager",
                        fullgraph: bool = True, seq: int = 16, text: int = 8, model_kwargs: dict | None = None):
    """One process (eager) vs parallel eager vs parallel compiled, on three calls of the same shapes; per rank."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, make_inputs = tiny_transformers.build(model_name, **(model_kwargs or {}))
    calls = _step_inputs(make_inputs, seq, text)
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        with SplitProbe(reference_model) as reference_probe:
            reference = [_first(reference_model(**copy.deepcopy(calls[0])))]
        reference += [_first(reference_model(**copy.deepcopy(c))) for c in calls[1:]]
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    recorder = RecordingBackend(backend)
    try:
        with torch.no_grad():
            with SplitProbe(model) as probe:
                eager = [_first(model(**copy.deepcopy(calls[0])))]
            eager += [_first(model(**copy.deepcopy(c))) for c in calls[1:]]
            compiled_model = _compile(model, mode, recorder, fullgraph)
            compiled, graphs_after = [], []
            for c in calls:
                compiled.append(_first(compiled_model(**copy.deepcopy(c))))
                graphs_after.append(recorder.graphs)
        result = {
            "rank": dist.get_rank(),
            "split": probe.summary(),
            "split_reference": reference_probe.summary(),
            "parallel_diff": max((e - r).abs().max().item() for e, r in zip(eager, reference)),
            "compiled_diff": max((c - e).abs().max().item() for c, e in zip(compiled, eager)),
            "graphs_after_each_call": graphs_after,
            "graph_breaks": _graph_breaks(),
            "graph_break_reasons": sorted(counters["graph_break"]),
            "recompiles": sum(counters["recompiles"].values()) if "recompiles" in counters else 0,
            "collectives_in_graphs": recorder.collectives,
        }
    finally:
        handle.detach()
        torch._dynamo.reset()
    return result


def compiled_call_disagreement(model_name: str = "flux", config: dict | None = None):
    """torch.compile(model) on a bare parallel model: the per-call agreement still runs inside the compiled
    call (it is excluded from the graph, not traced away). Rank 1 passes another timestep; the error message
    (or None) per rank."""
    import torch._dynamo

    torch._dynamo.reset()
    model, make_inputs = tiny_transformers.build(model_name, heads=4)
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**(config or {"ulysses_size": 2})))
    compiled = torch.compile(model, backend="aot_eager")
    inputs = make_inputs(seq=16, text=8)
    try:
        with torch.no_grad():
            compiled(**copy.deepcopy(inputs))  # compiled, agreed
            if dist.get_rank() == 1:
                inputs["timestep"] = inputs["timestep"] * 0.5
            try:
                compiled(**copy.deepcopy(inputs))
            except diffpar.DiffparError as exc:
                return f"{type(exc).__name__}: {exc}"
        return None
    finally:
        handle.detach()
        torch._dynamo.reset()


def compiled_pipeline(config: dict, steps: int = 2, backend: str = "aot_eager", extra: tuple = ()):
    """A whole tiny FluxPipeline, parallel, its transformer compiled regionally (fullgraph): two pipeline calls
    compile the blocks once; images within tolerance of the eager parallel pipeline."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = tiny_pipelines.build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    cfg = dict(config, extra_parallel_modules=[getattr(pipe, name) for name in extra])
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(**cfg))

    def call(seed):
        return pipe(prompt="a red fox in snow", height=32, width=32, num_inference_steps=steps, guidance_scale=3.5,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(seed), output_type="pt").images

    recorder = RecordingBackend(backend)
    try:
        with torch.no_grad():
            with SplitProbe(pipe.transformer) as probe:
                eager = [call(0), call(1)]
            pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=recorder)
            compiled, graphs_after = [], []
            for seed in (0, 1):
                compiled.append(call(seed))
                graphs_after.append(recorder.graphs)
        return {
            "rank": dist.get_rank(),
            "split": probe.summary(),
            "compiled_diff": max((c - e).abs().max().item() for c, e in zip(compiled, eager)),
            "graphs_after_each_call": graphs_after,
            "graph_breaks": _graph_breaks(),
            "collectives_in_graphs": recorder.collectives,
        }
    finally:
        handle.detach(strict=False)  # sharded text encoders freed their full weights: reported, not raised
        torch._dynamo.reset()
