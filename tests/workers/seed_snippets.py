"""The seed document's four snippets, written as users copy them with only the import changed (cache_dit ->
diffpar), run on tiny pipelines and compared with the same pipeline and cache in one process."""
from __future__ import annotations

import contextlib

import torch

import diffpar as cache_dit  # the only change from the seed: `import cache_dit`
from diffpar import DBCacheConfig, ParallelismConfig
from diffpar.testing import tiny_controlnets, tiny_pipelines
from diffpar.testing.probes import SplitProbe


def _flux():
    pipe = tiny_pipelines.build_tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_call(pipe):
    return pipe("a red fox in snow", height=32, width=32, num_inference_steps=4, max_sequence_length=16,
                guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="pt").images


def _zimage():
    pipe, _ = tiny_controlnets.build_pipeline("zimage", text_encoder=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _zimage_call(pipe):
    from diffpar.testing.tiny_controlnets import _image

    return pipe("a red fox in snow", height=32, width=32, num_inference_steps=4, max_sequence_length=32,
                guidance_scale=1.0, control_image=_image(1, 32, 32, 3), controlnet_conditioning_scale=0.8,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


def _probes(pipe):
    """SplitProbes on the transformer and, where the pipeline has one, the ControlNet."""
    probes = {"split": SplitProbe(pipe.transformer)}
    if getattr(pipe, "controlnet", None) is not None:
        probes["split_controlnet"] = SplitProbe(pipe.controlnet)
    return probes


def _probed(pipe, call):
    """`call(pipe)` under the probes; returns (output, {key: SplitProbe summary})."""
    probes = _probes(pipe)
    with contextlib.ExitStack() as stack, torch.no_grad():
        for probe in probes.values():
            stack.enter_context(probe)
        out = call(pipe)
    return out, {key: probe.summary() for key, probe in probes.items()}


def _reference(build, call):
    pipe = build()
    cache_dit.enable_cache(pipe, cache_config=DBCacheConfig())  # the same cache, one process
    return _probed(pipe, call)


def snippet(which: str):
    build, call = (_zimage, _zimage_call) if which == "zimage-controlnet" else (_flux, _flux_call)
    reference, split_reference = _reference(build, call)
    pipe = build()
    if which == "tp-text-encoder":
        # Transformer Tensor Parallelism + Text Encoder Tensor Parallelism
        cache_dit.enable_cache(
            pipe,
            cache_config=DBCacheConfig(),
            parallelism_config=ParallelismConfig(
                tp_size=2,
                parallel_kwargs={
                    "extra_parallel_modules": [pipe.text_encoder],  # FLUX.2
                },
            ),
        )
    elif which == "cp-text-encoder":
        # Transformer Context Parallelism + Text Encoder Tensor Parallelism
        cache_dit.enable_cache(
            pipe,
            cache_config=DBCacheConfig(),
            parallelism_config=ParallelismConfig(
                ulysses_size=2,
                parallel_kwargs={
                    "extra_parallel_modules": [pipe.text_encoder],  # FLUX.2
                },
            ),
        )
    elif which == "cp-text-encoder-vae":
        # Transformer Context Parallelism + Text Encoder Tensor Parallelism + VAE Data Parallelism
        cache_dit.enable_cache(
            pipe,
            cache_config=DBCacheConfig(),
            parallelism_config=ParallelismConfig(
                ulysses_size=2,
                parallel_kwargs={
                    "extra_parallel_modules": [pipe.text_encoder, pipe.vae],  # FLUX.1
                },
            ),
        )
    elif which == "zimage-controlnet":
        # Transformer CP + Text Encoder TP + VAE Data Parallelism + ControlNet CP
        cache_dit.enable_cache(
            pipe,
            cache_config=DBCacheConfig(),
            parallelism_config=ParallelismConfig(
                ulysses_size=2,
                # case: Z-Image-Turbo-Fun-ControlNet-2.1
                parallel_kwargs={
                    "extra_parallel_modules": [pipe.text_encoder, pipe.vae, pipe.controlnet],
                },
            ),
        )
    out, split = _probed(pipe, call)
    stats = cache_dit.cache.cache_stats(pipe) if hasattr(cache_dit.cache, "cache_stats") else None
    # The snippets never detach (a script exits instead); the pool would fail the test for the shims left behind.
    pipe._diffpar_handle.detach(strict=False)  # sharded text encoders: "reload" is expected here
    return {"rank": torch.distributed.get_rank(), "diff": (out - reference).abs().max().item(), "stats": repr(stats),
            **split, **{f"{key}_reference": summary for key, summary in split_reference.items()}}
