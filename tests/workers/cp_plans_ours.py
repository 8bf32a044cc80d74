"""Rank-side checks for diffpar's own context-parallel plans (Z-Image, SD3, HunyuanVideo)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.patch import is_diffpar_patch
from diffpar.testing import tiny_transformers
from diffpar.testing.probes import SplitProbe


def _sample(out) -> torch.Tensor:
    first = out[0] if isinstance(out, (tuple, list)) else out.sample
    # Z-Image returns one tensor per sample (sizes may differ): flatten them into one vector to compare.
    if isinstance(first, (list, tuple)):
        return torch.cat([t.flatten() for t in first])
    return first


def _run(model, inputs, output_types: list | None = None):
    with torch.no_grad():
        out = model(**copy.deepcopy(inputs))
    if output_types is not None:
        output_types.append(type(out).__name__)
    return _sample(out)


def _probed_run(model, inputs, output_types: list | None = None):
    """_run, with what the first attention saw and the collectives issued (SplitProbe summary)."""
    with SplitProbe(model) as probe:
        out = _run(model, inputs, output_types)
    return out, probe.summary()


def cp_equivalence(model_name: str, config: dict, model_kwargs: dict | None = None, input_kwargs: dict | None = None,
                   calls: int = 1, enable: bool = True, return_dict: bool = False):
    """Same seeded model in one process vs context parallel on this world; then detach and compare again.

    `calls` > 1 runs the parallel model several times (hooks and caches must not drift between calls). The split
    evidence of each parallel call is in "split_calls" ("split": the first), the one-process run's in
    "split_reference". `enable=False` skips enable_cache: the no-op the split checks must catch. `return_dict=True`:
    the model is called the default way (a diffusers output object; its class name in "output_type").
    """
    model, make_inputs = tiny_transformers.build(model_name, **(model_kwargs or {}))
    inputs = make_inputs(**(input_kwargs or {}))
    if return_dict:
        inputs["return_dict"] = True
    output_types: list = []
    reference, split_reference = _probed_run(copy.deepcopy(model), inputs)
    before = _run(model, inputs)
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config)) if enable else None
    runs = [_probed_run(model, inputs, output_types) for _ in range(calls)]
    diffs = [(out - reference).abs().max().item() for out, _ in runs]
    split_calls = [summary for _, summary in runs]
    if handle is None:
        return {"rank": dist.get_rank(), "diff": max(diffs), "split": split_calls[0],
                "split_reference": split_reference}
    steps = handle.step_names
    handle.detach()
    after = _run(model, inputs)
    return {
        "rank": dist.get_rank(),
        "split": split_calls[0],
        "split_calls": split_calls,
        "split_reference": split_reference,
        "diff": max(diffs),
        "detach_diff": (after - before).abs().max().item(),
        "detach_bitwise": torch.equal(after, before),
        "steps": steps,
        "output_type": output_types[0] if output_types else None,
    }


def cp_forward_error(model_name: str, config: dict, model_kwargs: dict | None = None,
                     input_kwargs: dict | None = None):
    """Enable, run one forward that must fail; return the error type and message seen on this rank."""
    model, make_inputs = tiny_transformers.build(model_name, **(model_kwargs or {}))
    inputs = make_inputs(**(input_kwargs or {}))
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result = {"rank": dist.get_rank(), "type": type(exc).__name__, "message": str(exc)}
    else:
        result = {"rank": dist.get_rank(), "type": None, "message": ""}
    handle.detach()
    return result


def cp_enable_error(model_name: str, config: dict, model_kwargs: dict | None = None, mutate: str | None = None):
    """enable_cache must refuse this model on every rank (local check); the model must be left untouched."""
    model, _ = tiny_transformers.build(model_name, **(model_kwargs or {}))
    if mutate == "sd3_unknown_processor":
        from diffusers.models.attention_processor import AttnProcessor2_0

        model.transformer_blocks[0].attn.processor = AttnProcessor2_0()
    processors = [getattr(m, "processor", None) for m in model.modules()]
    try:
        diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    except Exception as exc:  # noqa: BLE001
        error = {"type": type(exc).__name__, "message": str(exc)}
    else:
        error = {"type": None, "message": ""}
    untouched = all(a is b for a, b in zip(processors, [getattr(m, "processor", None) for m in model.modules()]))
    return {"rank": dist.get_rank(), **error, "untouched": untouched}


def leftovers_after_detach(model_names: list[str]):
    """Enable then detach each model; list what is left: hooks, instance-level patches, swapped processors."""
    leftovers = {}
    for name in model_names:
        model, _ = tiny_transformers.build(name)
        processors = {n: getattr(m, "processor", None) for n, m in model.named_modules()}
        handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=2))
        handle.detach()
        found = []
        for module_name, module in model.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.hooks:
                found.append(f"{module_name}: hooks {sorted(registry.hooks)}")
            # diffusers' hook registry keeps its own (now empty) forward wrapper: only a diffpar Patch is ours.
            if is_diffpar_patch(vars(module).get("forward")):
                found.append(f"{module_name}: patched forward")
            processor = getattr(module, "processor", None)
            if processor is not processors[module_name]:
                found.append(f"{module_name}: processor {type(processor).__name__}")
            if getattr(processor, "_parallel_config", None) is not None:
                found.append(f"{module_name}: processor keeps a parallel config")
        leftovers[name] = found
    return {"rank": dist.get_rank(), "leftovers": leftovers}


def backend_survives_processor_swap(model_name: str):
    """A backend set on the model before enable_cache is still the one its (swapped) processors use."""
    from diffpar.engines.context_parallel import attention_processors

    model, _ = tiny_transformers.build(model_name)
    for _, processor in attention_processors(model):
        processor._attention_backend = "native"  # what set_attention_backend("native") leaves on each processor
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=2))
    backends = sorted({str(getattr(p, "_attention_backend", None)) for _, p in attention_processors(model)})
    swapped = sorted({type(p).__name__ for _, p in attention_processors(model)})
    handle.detach()
    return {"rank": dist.get_rank(), "backends": backends, "processors": swapped}
