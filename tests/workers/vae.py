"""Rank-side checks for split VAE decode / encode (tests/test_vae.py)."""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_vaes


class VaePipe:
    """The smallest object enable_cache treats as a pipeline: a VAE beside a (trivial) denoiser."""

    def __init__(self, vae):
        self.vae = vae
        self.transformer = torch.nn.Identity()
        self.components = {"vae": vae, "transformer": self.transformer}


def _enable(vae, **config):
    pipe = VaePipe(vae)
    handle = diffpar.enable_cache(
        pipe, parallelism_config=diffpar.ParallelismConfig(extra_parallel_modules=[pipe.vae], **config)
    )
    return handle, handle.state("vae")


def _max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def _inputs(vae, height, width, batch, frames, image_extra_rows, make_latents, make_images):
    shape = vae.diffpar_shape
    latents = make_latents(height=height, width=width, batch=batch, frames=frames)
    image_frames = 1 + shape.frames_per_latent * (frames - 1) if shape.video else 1
    images = make_images(height=height * shape.spatial + image_extra_rows, width=width * shape.spatial, batch=batch,
                         frames=image_frames)
    return latents, images


def equivalence(family: str, height: int = 13, width: int = 10, batch: int = 2, frames: int = 3,
                dtype: str = "float32", encode: bool = True, image_extra_rows: int = 0, min_rows: int | None = 0,
                tiling: dict | None = None, slicing: bool = False):
    """Split decode/encode vs the same VAE in one process (computed here first, on a copy)."""
    vae, make_latents, make_images = tiny_vaes.build(family, dtype=getattr(torch, dtype))
    latents, images = _inputs(vae, height, width, batch, frames, image_extra_rows, make_latents, make_images)
    if tiling is not None:
        vae.enable_tiling(**tiling)
    if slicing:
        vae.enable_slicing()
    reference = copy.deepcopy(vae)
    want_decode = tiny_vaes.decode(reference, latents)
    want_encode = tiny_vaes.encode(reference, images) if encode else None
    handle, state = _enable(vae, vae_split_min_rows=min_rows)
    got_decode = tiny_vaes.decode(vae, latents)
    got_encode = tiny_vaes.encode(vae, images) if encode else None
    result = {
        "rank": dist.get_rank(),
        "decode_diff": _max_diff(got_decode, want_decode),
        "decode_shape": tuple(got_decode.shape),
        "want_shape": tuple(want_decode.shape),
        "calls": copy.deepcopy(state.calls),
        "sizes": state.last_sizes,
        "stats": state.stats.as_dict(),
        "steps": handle.step_names,
    }
    if encode:
        result["encode_diff"] = _max_diff(got_encode, want_encode)
    handle.detach()
    result["detach_decode_diff"] = _max_diff(tiny_vaes.decode(vae, latents), want_decode)
    if encode:
        result["detach_encode_diff"] = _max_diff(tiny_vaes.encode(vae, images), want_encode)
    result["patched_left"] = sorted(
        name for name, m in vae.named_modules() if "forward" in vars(m)
    )
    return result


def bf16_accuracy(family: str, height: int = 13, width: int = 10, batch: int = 2, frames: int = 3):
    """bf16 split decode vs the fp32 one-process decode, beside bf16 one-process vs the same fp32 decode."""
    vae32, make_latents, make_images = tiny_vaes.build(family)
    latents, images = _inputs(vae32, height, width, batch, frames, 0, make_latents, make_images)
    want = tiny_vaes.decode(vae32, latents)
    want_encode = tiny_vaes.encode(vae32, images)
    vae16 = copy.deepcopy(vae32).to(torch.bfloat16)
    one_process = tiny_vaes.decode(vae16, latents.bfloat16())
    one_process_encode = tiny_vaes.encode(vae16, images.bfloat16())
    handle, _ = _enable(vae16, vae_split_min_rows=0)
    split = tiny_vaes.decode(vae16, latents.bfloat16())
    split_encode = tiny_vaes.encode(vae16, images.bfloat16())
    handle.detach()
    return {
        "one_process_err": _max_diff(one_process, want),
        "split_err": _max_diff(split, want),
        "one_process_encode_err": _max_diff(one_process_encode, want_encode),
        "split_encode_err": _max_diff(split_encode, want_encode),
        "split_vs_one_process": _max_diff(split, one_process),
    }


def size_rule(family: str, heights: list[int], min_rows: int | None, width: int = 10):
    """Which decodes split under a size rule; results must equal one process either way."""
    vae, make_latents, _ = tiny_vaes.build(family)
    reference = copy.deepcopy(vae)
    handle, state = _enable(vae, vae_split_min_rows=min_rows)
    out = []
    for h in heights:
        latents = make_latents(height=h, width=width, batch=1, frames=2)
        before = copy.deepcopy(state.calls["decode"])
        diff = _max_diff(tiny_vaes.decode(vae, latents), tiny_vaes.decode(reference, latents))
        split = state.calls["decode"]["split"] > before["split"]
        out.append({"height": h, "split": split, "diff": diff, "sizes": state.last_sizes if split else None})
    handle.detach()
    return out


def mismatched_shapes(family: str = "kl"):
    """Rank 0 decodes a taller latent than the others: every rank must raise, none may hang."""
    vae, make_latents, _ = tiny_vaes.build(family)
    handle, _ = _enable(vae, vae_split_min_rows=0)
    latents = make_latents(height=14 if dist.get_rank() == 0 else 12, width=10, batch=1)
    try:
        tiny_vaes.decode(vae, latents)
    except diffpar.RankMismatchError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    finally:
        handle.detach()
    return {"error": None}


def skipping_rank(timeout_s: float = 2.0):
    """Rank 1 never decodes: the others must fail after the handshake timeout with a message, not hang."""
    vae, make_latents, _ = tiny_vaes.build("kl")
    handle, _ = _enable(vae, vae_split_min_rows=0, timeout_s=timeout_s)
    if dist.get_rank() == 1:
        return "skipped decode"
    tiny_vaes.decode(vae, make_latents(height=12, width=10))
    return "decoded alone"


def refused(case: str):
    """enable_cache must refuse a VAE it cannot split exactly, on every rank, before any collective."""
    vae, _, _ = tiny_vaes.build("kl")
    if case == "unknown-layer":
        conv = vae.decoder.conv_out
        vae.decoder.conv_out = torch.nn.Sequential(
            torch.nn.ReflectionPad2d(1),
            torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3),
        )
    elif case == "fused-attention":
        vae.fuse_qkv_projections()
    elif case == "group-offload":
        try:
            vae.enable_group_offload(torch.device("cpu"), offload_type="leaf_level")
        except AttributeError as exc:  # diffusers 0.36 needs an accelerator to even set it up
            return {"error": "setup-unavailable", "message": str(exc)}
    elif case == "bilinear-upsample":
        vae.decoder.up_blocks[0].upsamplers[0] = torch.nn.Upsample(scale_factor=2, mode="bilinear")
    first = _enable(vae, vae_split_min_rows=0)[0] if case == "shared" else None
    try:
        _enable(vae, vae_split_min_rows=0)
    except diffpar.DiffparError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    finally:
        if first is not None:
            first.detach()
    return {"error": None}


def pipeline_flux(config: dict, steps: int = 2, height: int = 32, width: int = 32):
    """The tiny Flux pipeline, transformer context parallel + VAE split, vs the same pipeline in one process."""
    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    def run(pipe):
        with torch.no_grad():
            return pipe(
                prompt="a red cube", height=height, width=width, num_inference_steps=steps, max_sequence_length=16,
                guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="pt",
            ).images

    reference = run(build_tiny_flux_pipeline())
    pipe = build_tiny_flux_pipeline()
    handle = diffpar.enable_cache(
        pipe, parallelism_config=diffpar.ParallelismConfig(
            extra_parallel_modules=[pipe.vae], vae_split_min_rows=0, **config
        )
    )
    state = handle.state("vae")
    got = run(pipe)
    handle.detach()
    return {"diff": _max_diff(got, reference), "calls": copy.deepcopy(state.calls), "sizes": state.last_sizes,
            "shape": tuple(got.shape)}
