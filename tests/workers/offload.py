"""Rank-side runs of a tiny FluxPipeline with diffusers' offloading and diffpar together (tests/test_offload.py).

On CPU the "device" offloaded to is the CPU itself (`device="cpu"`): the hooks are installed and run exactly as on
a GPU (they move each model to the execution device before its forward and the previous one back), only the
copies are no-ops. What is checked is that diffpar's hooks and shards and the offload hooks compose.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_pipelines
from diffpar.testing.probes import SplitProbe


def _call(pipe, seed: int = 0):
    return pipe(prompt="a red fox in snow", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=16, generator=torch.Generator().manual_seed(seed), output_type="pt").images


def _build():
    pipe = tiny_pipelines.build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _offload(pipe, kind: str) -> None:
    cpu = torch.device("cpu")
    if kind == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    elif kind == "sequential":
        pipe.enable_sequential_cpu_offload(device="cpu")
    elif kind == "group":
        pipe.transformer.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="block_level",
                                              num_blocks_per_group=1)
    elif kind == "group_vae":
        pipe.vae.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    else:
        raise ValueError(kind)


def _offload_hooks(pipe) -> dict:
    """Which offload hooks each model carries: accelerate's (model offload) or diffusers' group offloading."""
    found = {}
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipe, name)
        registry = getattr(module, "_diffusers_hook", None)
        hooks = []
        if hasattr(module, "_hf_hook"):
            hooks.append(type(module._hf_hook).__name__)
        if registry is not None:
            hooks += [h for h in registry.hooks if "offload" in h]
        found[name] = hooks
    return found


def offload_equivalence(kind: str, order: str, config: dict, extra: tuple = ()):
    """One process without offload vs this world with `kind` offload enabled `order` ("before" / "after")
    enable_cache. Per rank: image diff, split evidence, the offload hooks in place during the call."""
    reference_pipe = _build()
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = _call(reference_pipe)
    del reference_pipe
    pipe = _build()
    if order == "before":
        _offload(pipe, kind)
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
        **config, extra_parallel_modules=[getattr(pipe, n) for n in extra]))
    try:
        if order == "after":
            _offload(pipe, kind)
        with torch.no_grad(), SplitProbe(pipe.transformer) as probe:
            out = _call(pipe)
        return {"rank": dist.get_rank(), "diff": (out - reference).abs().max().item(), "split": probe.summary(),
                "split_reference": reference_probe.summary(), "hooks": _offload_hooks(pipe),
                "steps": handle.step_names}
    finally:
        handle.detach(strict=False)


def offload_refused(kind: str, config: dict, extra: tuple = ()):
    """enable_cache after `kind` offload: the error message, and whether anything of diffpar's was left behind."""
    pipe = _build()
    _offload(pipe, kind)
    processors = {n: getattr(m, "processor", None) for n, m in pipe.transformer.named_modules()}
    try:
        diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
            **config, extra_parallel_modules=[getattr(pipe, n) for n in extra]))
    except diffpar.DiffparError as exc:
        unchanged = all(getattr(m, "processor", None) is processors[n] for n, m in pipe.transformer.named_modules())
        registry = getattr(pipe.transformer, "_diffusers_hook", None)
        cp_hooks = [h for h in (registry.hooks if registry is not None else {}) if "parallel" in h]
        return {"error": f"{type(exc).__name__}: {exc}", "unchanged": unchanged and not cp_hooks}
    diffpar.disable_cache(pipe)
    return {"error": None}
