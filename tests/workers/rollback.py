"""Rank-side: a failure injected into one apply step (on some ranks) must leave the pipeline exactly as before."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

import diffpar
from diffpar import applying
from diffpar.compat.diffusers_cp import SHARED_SHIMS
from diffpar.testing import tiny_pipelines

PROMPT = "a red fox in snow"


def _run(pipe):
    with torch.no_grad():
        return pipe(prompt=PROMPT, height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0), output_type="pt", guidance_scale=3.5).images


def _structure(pipe) -> dict:
    """What a rollback must restore besides the weights: module classes, live diffusers hooks, torch hooks,
    attention processors and their parallel config, instance attributes diffpar sets."""
    out = {"pipeline_attrs": sorted(k for k in vars(pipe) if k in ("prepare_latents", "_diffpar_handle"))}
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for path, module in component.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            processor = getattr(module, "processor", None)
            out[f"{name}.{path}"] = (
                type(module).__name__,
                tuple(sorted(getattr(registry, "hooks", {}) or {})),
                len(module._forward_hooks), len(module._forward_pre_hooks),
                type(processor).__name__ if processor is not None else None,
                getattr(processor, "_parallel_config", None) is not None,
                getattr(module, "_parallel_config", None) is not None,
                tuple(sorted(k for k in vars(module) if k.startswith("_diffpar"))),
            )
    return out


def _weights(pipe) -> dict:
    return {f"{name}.{k}": v.detach().clone() for name, c in pipe.components.items()
            if isinstance(c, torch.nn.Module) for k, v in c.state_dict().items()}


def inject_failure(step: str, fail_ranks: list[int], config: dict, extra: list[str]) -> dict:
    """Fail `step` on `fail_ranks` right after it made its change; report what is left on this rank."""
    pipe = tiny_pipelines.build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    reference = _run(pipe)
    weights, structure = _weights(pipe), _structure(pipe)

    steps_run = []
    original = applying.apply_step

    def failing(name, fn, *args, **kwargs):
        steps_run.append(name)
        out = fn(*args, **kwargs)
        if name == step and dist.get_rank() in fail_ranks:
            raise RuntimeError(f"injected failure after the {step!r} step")
        return out

    applying.apply_step = failing
    started = time.monotonic()
    error = None
    try:
        cfg = dict(config, extra_parallel_modules=[getattr(pipe, n) for n in extra])
        diffpar.enable_cache(pipe, cache_config=diffpar.DBCacheConfig(residual_diff_threshold=0.05),
                             parallelism_config=diffpar.ParallelismConfig(**cfg))
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    finally:
        applying.apply_step = original
    seconds = time.monotonic() - started

    after_weights = _weights(pipe)
    after_structure = _structure(pipe)
    changed_weights = sorted(k for k in weights if k not in after_weights or not torch.equal(weights[k], after_weights[k]))
    changed_weights += sorted(set(after_weights) - set(weights))
    changed_structure = sorted(k for k in set(structure) | set(after_structure)
                               if structure.get(k) != after_structure.get(k))
    output_diff = (_run(pipe) - reference).abs().max().item()
    return {
        "rank": dist.get_rank(),
        "error": error,
        "seconds": seconds,
        "step_ran": step in steps_run,
        "changed_weights": changed_weights[:5],
        "changed_structure": [(k, structure.get(k), after_structure.get(k)) for k in changed_structure[:5]],
        "output_diff": output_diff,
        "shims_active": SHARED_SHIMS.active,
    }
