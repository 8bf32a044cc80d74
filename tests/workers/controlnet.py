"""Rank-side checks for ControlNet context parallelism (with the transformer it feeds)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_controlnets
from diffpar.testing.probes import SplitProbe


def _shell_pipeline(family: str, transformer, controlnet):
    """The family's real pipeline class holding just the two models (enough for enable_cache's module lookup)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler()
    if family == "flux":
        from diffusers import FluxControlNetPipeline

        return FluxControlNetPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                      text_encoder_2=None, tokenizer_2=None, transformer=transformer,
                                      controlnet=controlnet)
    if family == "qwenimage":
        from diffusers import QwenImageControlNetPipeline

        return QwenImageControlNetPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                           transformer=transformer, controlnet=controlnet)
    if family == "sd3":
        from diffusers import StableDiffusion3ControlNetPipeline

        return StableDiffusion3ControlNetPipeline(
            transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, controlnet=controlnet)
    if family == "zimage":
        from diffusers import ZImageControlNetPipeline

        return ZImageControlNetPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                        transformer=transformer, controlnet=controlnet)
    raise ValueError(family)


def _split_evidence(tf_probe, ref_tf_probe, cn_probe, ref_cn_probe) -> dict:
    """SplitProbe summaries: "split" (transformer) and "split_controlnet", each with its one-process "_reference"."""
    return {"split": tf_probe.summary(), "split_reference": ref_tf_probe.summary(),
            "split_controlnet": cn_probe.summary(), "split_controlnet_reference": ref_cn_probe.summary()}


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def pair_equivalence(family: str, config: dict, seq: int = 16, text: int = 8, batch: int = 1,
                     pair_kwargs: dict | None = None, input_kwargs: dict | None = None):
    """ControlNet -> transformer, as the pipeline calls them: one process vs parallel, then detach."""
    pair = tiny_controlnets.build_pair(family, **(pair_kwargs or {}))
    cn_kwargs, tf_kwargs = pair.inputs(seq=seq, text=text, batch=batch, **(input_kwargs or {}))
    # One deepcopy: modules the ControlNet shares with the transformer (Z-Image's refiners) stay shared.
    ref_transformer, ref_controlnet = copy.deepcopy((pair.transformer, pair.controlnet))
    with torch.no_grad():
        with SplitProbe(ref_transformer) as ref_tf_probe, SplitProbe(ref_controlnet) as ref_cn_probe:
            reference = pair.run(copy.deepcopy(cn_kwargs), copy.deepcopy(tf_kwargs), ref_transformer, ref_controlnet)
        without = pair.transformer(**copy.deepcopy(tf_kwargs))
        without = without[0] if isinstance(without, (tuple, list)) else without.sample
        if isinstance(without, list):  # Z-Image: per-sample outputs, flattened like pair.run's
            without = torch.cat([o.flatten() for o in without])
    pipe = _shell_pipeline(family, pair.transformer, pair.controlnet)
    controlnet_bytes = _param_bytes(pair.controlnet)
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
        **config, extra_parallel_modules=[pipe.controlnet]))
    controlnet_bytes_ratio = _param_bytes(pair.controlnet) / controlnet_bytes
    try:
        with torch.no_grad(), SplitProbe(pair.transformer) as tf_probe, SplitProbe(pair.controlnet) as cn_probe:
            parallel = pair.run(copy.deepcopy(cn_kwargs), copy.deepcopy(tf_kwargs))
    except BaseException:
        handle.detach()  # a refusal or failure must not leave the shims installed for the next test
        raise
    result = {
        **_split_evidence(tf_probe, ref_tf_probe, cn_probe, ref_cn_probe),
        "diff": (parallel - reference).abs().max().item(),
        # how much the ControlNet changes the output: a wrongly split residual would show at this scale
        "controlnet_effect": (reference - without).abs().max().item(),
        "controlnet_bytes_ratio": controlnet_bytes_ratio,  # parameter bytes this rank holds / the whole ControlNet
        "steps": handle.step_names,
        "rank": dist.get_rank(),
    }
    handle.detach()
    with torch.no_grad():
        after = pair.run(copy.deepcopy(cn_kwargs), copy.deepcopy(tf_kwargs))
    result["detach_diff"] = (after - reference).abs().max().item()
    result["detached_clean"] = not any(
        getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks
        for m in list(pair.transformer.modules()) + list(pair.controlnet.modules())
    )
    return result


def pipeline_equivalence(family: str, config: dict, builder_kwargs: dict | None = None,
                         call_kwargs: dict | None = None, extra: tuple = ("controlnet",),
                         unsynced_global_rng: bool = False):
    """The whole ControlNet pipeline: one process vs parallel (same pipeline, before enabling), then detach."""
    pipe, make_call = tiny_controlnets.build_pipeline(family, **(builder_kwargs or {}))
    pipe.set_progress_bar_config(disable=True)

    def run(seed_global: bool = True):
        # SD3's pipeline samples the control image's latent from the global RNG: seed it for a comparable
        # reference (ranks need not agree: diffpar broadcasts ControlNet conditions from rank 0).
        torch.manual_seed(1234 + (0 if seed_global else 1000 * dist.get_rank()))
        with torch.no_grad():
            out = pipe(**make_call(**(call_kwargs or {})))
        return out[0] if isinstance(out, tuple) else out.images

    with SplitProbe(pipe.transformer) as ref_tf_probe, SplitProbe(pipe.controlnet) as ref_cn_probe:
        reference = run()
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
        **config, extra_parallel_modules=list(extra)))
    with SplitProbe(pipe.transformer) as tf_probe, SplitProbe(pipe.controlnet) as cn_probe:
        parallel = run(seed_global=not unsynced_global_rng)
    result = {
        **_split_evidence(tf_probe, ref_tf_probe, cn_probe, ref_cn_probe),
        "diff": (parallel - reference).abs().max().item(),
        "scale": reference.abs().max().item(),
        "rank": dist.get_rank(),
        "steps": handle.step_names,
    }
    handle.detach()
    result["detach_diff"] = (run() - reference).abs().max().item()
    return result


def expect_error(family: str, config: dict, pair_kwargs: dict | None = None, seq: int = 16, text: int = 8,
                 run_step: bool = False):
    """The DiffparError text enable_cache (or, with run_step, the first step) raises on this rank, else None."""
    pair = tiny_controlnets.build_pair(family, **(pair_kwargs or {}))
    pipe = _shell_pipeline(family, pair.transformer, pair.controlnet)
    handle = None
    try:
        handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
            **config, extra_parallel_modules=[pipe.controlnet]))
        if run_step:
            cn_kwargs, tf_kwargs = pair.inputs(seq=seq, text=text)
            with torch.no_grad():
                pair.run(cn_kwargs, tf_kwargs)
    except diffpar.DiffparError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if handle is not None and not handle.detached:
            handle.detach()
    return None


def unlisted_controlnet_check(family: str, config: dict, listed: tuple = ()):
    """The check api.py is asked to run (see the issue-5 report): message for an unlisted ControlNet, else None."""
    from diffpar.families.controlnets.base import check_controlnet_listed

    pair = tiny_controlnets.build_pair(family)
    pipe = _shell_pipeline(family, pair.transformer, pair.controlnet)
    try:
        check_controlnet_listed(pipe, diffpar.ParallelismConfig(**config), set(listed))
    except diffpar.DiffparError as exc:
        return str(exc)
    return None
