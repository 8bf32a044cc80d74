"""The seed document's four snippets, written as users copy them with only the import changed (cache_dit ->
diffpar), run on tiny pipelines and compared with the same pipeline and cache in one process."""
from __future__ import annotations

import torch

import diffpar as cache_dit  # the only change from the seed: `import cache_dit`
from diffpar import DBCacheConfig, ParallelismConfig
from diffpar.testing import tiny_controlnets, tiny_pipelines


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


def _reference(build, call):
    pipe = build()
    cache_dit.enable_cache(pipe, cache_config=DBCacheConfig())  # the same cache, one process
    with torch.no_grad():
        return call(pipe)


def snippet(which: str):
    build, call = (_zimage, _zimage_call) if which == "zimage-controlnet" else (_flux, _flux_call)
    reference = _reference(build, call)
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
    with torch.no_grad():
        out = call(pipe)
    stats = cache_dit.cache.cache_stats(pipe) if hasattr(cache_dit.cache, "cache_stats") else None
    return {"diff": (out - reference).abs().max().item(), "stats": repr(stats)}
