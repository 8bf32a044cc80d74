"""Rank-side whole text-to-image pipelines (tests/test_image_pipelines_a.py): Chroma (and its img2img), CogView4,
Lumina 2, Sana, PixArt-Sigma (and -Alpha), AuraFlow. Each is built tiny here from local parts (seeded random
weights, in-memory tokenizers), run in one process, then on every rank under `enable_cache` with the transformer
context parallel, every text encoder tensor parallel and the VAE split (decode; img2img's encode too).

Prompt lengths are odd where the pipeline lets the caller choose (max_sequence_length=15 with padding to it):
CogView4 always left-pads its prompt to a multiple of 16 itself, so its text length is even whatever we ask.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_pipelines, tiny_text_encoders, tiny_transformers, tiny_vaes
from diffpar.testing.probes import SplitProbe
from diffpar.testing.tiny_transformers import construct
from workers.end_to_end import image_report, split_calls

PROMPT = "a red fox riding a small horse on the moon"
ODD_TEXT_LENGTH = 15
BUILDERS: dict[str, Callable] = {}


def builder(kind: str):
    def deco(fn):
        BUILDERS[kind] = fn
        return fn

    return deco


def build(kind: str, seed: int = 0):
    """(pipe, call_kwargs(steps, seed), names of the components made parallel beside the transformer)."""
    pipe, call_kwargs, parallel = BUILDERS[kind](seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call_kwargs, parallel


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kl_vae(seed: int):
    return tiny_pipelines.tiny_image_vae(seed, shift_factor=0.0609, scaling_factor=1.5035)


def _chroma_parts(seed: int) -> dict:
    """A T5 (gated-gelu) encoder, a Flux-style Chroma transformer with 2 x 2 packing (32 px: 64 image tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    t5, _ = tiny_text_encoders.build("t5-gated", seed=seed, heads=4, d_kv=8, d_model=32, d_ff=61, layers=2)
    transformer, _ = tiny_transformers.build("chroma", seed=seed + 2, heads=4, head_dim=16)
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_kl_vae(seed + 3), text_encoder=t5,
                tokenizer=tiny_text_encoders.t5_tokenizer(512), transformer=transformer)


def _guided_call(steps: int, seed: int, **extra) -> dict:
    """A 32 px call with a negative prompt and classifier-free guidance (Chroma, CogView4)."""
    return dict(prompt=PROMPT, negative_prompt="dark", height=32, width=32, num_inference_steps=steps,
                guidance_scale=4.0, max_sequence_length=ODD_TEXT_LENGTH, generator=_generator(seed),
                output_type="pt", **extra)


@builder("chroma")
def _chroma(seed: int):
    """ChromaPipeline: classifier-free guidance as two transformer calls per step."""
    from diffusers import ChromaPipeline

    return ChromaPipeline(**_chroma_parts(seed)), _guided_call, ("text_encoder", "vae")


@builder("chroma-img2img")
def _chroma_img2img(seed: int):
    """ChromaImg2ImgPipeline: the input image goes through the (split) VAE encode; its latents, noised to
    `strength`, are the starting point."""
    from diffusers import ChromaImg2ImgPipeline

    image = torch.rand(1, 3, 32, 32, generator=_generator(21))

    def call_kwargs(steps: int, seed: int) -> dict:
        # strength 0.5 of 2 * steps: `steps` denoising steps from a half-noised encoded image
        return _guided_call(2 * steps, seed, image=image, strength=0.5)

    return ChromaImg2ImgPipeline(**_chroma_parts(seed)), call_kwargs, ("text_encoder", "vae")


def _cogview4_parts(seed: int, in_channels: int) -> dict:
    """A GLM encoder (fused gate_up, partial rotary; its second-to-last hidden state is the prompt), a CogView4
    transformer on 2 x 2 patches (32 px: 64 image tokens) reading `in_channels` latent channels."""
    from diffusers import CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    glm, _ = tiny_text_encoders.build("glm", seed=seed, heads=4, kv_heads=2, head_dim=8, hidden=32, intermediate=48)
    torch.manual_seed(seed + 2)
    transformer = construct(
        CogView4Transformer2DModel, patch_size=2, in_channels=in_channels, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, text_embed_dim=32, time_embed_dim=16, condition_dim=4,
        sample_size=8, rope_axes_dim=(16, 16),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    return dict(tokenizer=tiny_text_encoders.t5_tokenizer(512), text_encoder=glm, vae=_kl_vae(seed + 3),
                transformer=transformer, scheduler=scheduler)


@builder("cogview4")
def _cogview4(seed: int):
    """CogView4Pipeline: classifier-free guidance as two transformer calls per step."""
    from diffusers import CogView4Pipeline

    return CogView4Pipeline(**_cogview4_parts(seed, in_channels=4)), _guided_call, ("text_encoder", "vae")


@builder("cogview4-control")
def _cogview4_control(seed: int):
    """CogView4ControlPipeline: the control image goes through the (split) VAE encode, and its posterior is sampled
    from torch's global RNG (no generator); its latents join the noise channel-wise (4 + 4)."""
    from diffusers import CogView4ControlPipeline

    control = torch.rand(1, 3, 32, 32, generator=_generator(22))

    def call_kwargs(steps: int, seed: int) -> dict:
        return _guided_call(steps, seed, control_image=control)

    return CogView4ControlPipeline(**_cogview4_parts(seed, in_channels=8)), call_kwargs, ("text_encoder", "vae")


def _gemma2(seed: int, hidden: int):
    """Gemma 2 (eager attention: its soft-capping), 4 query heads over 2 key/value heads."""
    model, _ = tiny_text_encoders.build("gemma2", attn="eager", seed=seed, heads=4, kv_heads=2, head_dim=8,
                                        hidden=hidden, intermediate=48)
    return model


@builder("lumina2")
def _lumina2(seed: int):
    """Lumina2Pipeline: a Gemma 2 encoder behind a system prompt, Lumina 2 transformer with grouped key/value
    heads (4 query, 2 key/value), 2 x 2 patches (64 image tokens), guidance as two calls per step."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    gemma = _gemma2(seed, hidden=16)
    torch.manual_seed(seed + 2)
    transformer = construct(
        Lumina2Transformer2DModel, sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
        num_refiner_layers=1, num_attention_heads=4, num_kv_heads=2, multiple_of=16, norm_eps=1e-5,
        axes_dim_rope=(4, 2, 2), axes_lens=(64, 64, 64), cap_feat_dim=16,
    ).eval()
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                           vae=_kl_vae(seed + 3), text_encoder=gemma, tokenizer=tiny_text_encoders.t5_tokenizer(512))

    def call_kwargs(steps: int, seed: int) -> dict:
        # Lumina2Pipeline assumes an 8x VAE (vae_scale_factor = 8): 128 px asks for a 16 x 16 latent, which the
        # tiny 2x VAE decodes to 32 px.
        return dict(prompt=PROMPT, negative_prompt="dark", height=128, width=128, num_inference_steps=steps,
                    guidance_scale=4.0, system_prompt="a photo", max_sequence_length=ODD_TEXT_LENGTH,
                    generator=_generator(seed), output_type="pt")

    return pipe, call_kwargs, ("text_encoder", "vae")


@builder("sana")
def _sana(seed: int):
    """SanaPipeline: a Gemma 2 encoder, Sana's linear-attention transformer on 1 x 1 patches, the DC-AE VAE (4x
    here: 32 px gives 8 x 8 = 64 image tokens), guidance as one batch of two."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    gemma = _gemma2(seed, hidden=16)
    torch.manual_seed(seed + 2)
    transformer = construct(
        SanaTransformer2DModel, in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8,
        num_layers=2, num_cross_attention_heads=4, cross_attention_head_dim=8, cross_attention_dim=32,
        caption_channels=16, sample_size=8, patch_size=1, interpolation_scale=1, qk_norm="rms_norm_across_heads",
    ).eval()
    vae, _, _ = tiny_vaes.build("dc", seed=seed + 3)
    pipe = SanaPipeline(tokenizer=tiny_text_encoders.t5_tokenizer(512), text_encoder=gemma, vae=vae,
                        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))

    def call_kwargs(steps: int, seed: int) -> dict:
        return dict(prompt=PROMPT, negative_prompt="dark", height=32, width=32, num_inference_steps=steps,
                    guidance_scale=4.0, max_sequence_length=ODD_TEXT_LENGTH, complex_human_instruction=None,
                    clean_caption=False, use_resolution_binning=False, generator=_generator(seed),
                    output_type="pt")

    return pipe, call_kwargs, ("text_encoder", "vae")


def _pixart(pipeline_cls, seed: int):
    """A PixArt pipeline: a T5 (gated-gelu) encoder, PixArt's transformer (cross-attention to the masked prompt,
    learned sigma), 2 x 2 patches (32 px: 64 image tokens), guidance as one batch of two, DDIM."""
    from diffusers import DDIMScheduler

    t5, _ = tiny_text_encoders.build("t5-gated", seed=seed, heads=4, d_kv=8, d_model=32, d_ff=61, layers=2)
    transformer, _ = tiny_transformers.build("pixart", seed=seed + 2, heads=4, head_dim=8, caption_channels=32)
    pipe = pipeline_cls(tokenizer=tiny_text_encoders.t5_tokenizer(512), text_encoder=t5, vae=_kl_vae(seed + 3),
                        transformer=transformer, scheduler=DDIMScheduler())

    def call_kwargs(steps: int, seed: int) -> dict:
        return dict(prompt=PROMPT, negative_prompt="dark", height=32, width=32, num_inference_steps=steps,
                    guidance_scale=4.0, max_sequence_length=ODD_TEXT_LENGTH, clean_caption=False,
                    use_resolution_binning=False, generator=_generator(seed), output_type="pt")

    return pipe, call_kwargs, ("text_encoder", "vae")


@builder("pixart-sigma")
def _pixart_sigma(seed: int):
    from diffusers import PixArtSigmaPipeline

    return _pixart(PixArtSigmaPipeline, seed)


@builder("pixart-alpha")
def _pixart_alpha(seed: int):
    from diffusers import PixArtAlphaPipeline

    return _pixart(PixArtAlphaPipeline, seed)


@builder("auraflow")
def _auraflow(seed: int):
    """AuraFlowPipeline: a UMT5 encoder, AuraFlow's transformer (8 register tokens before the prompt), 2 x 2
    patches (32 px: 64 image tokens), guidance as one batch of two."""
    from diffusers import AuraFlowPipeline, FlowMatchEulerDiscreteScheduler

    umt5, _ = tiny_text_encoders.build("umt5", seed=seed, heads=4, d_kv=8, d_model=32, d_ff=48, layers=2)
    transformer, _ = tiny_transformers.build("auraflow", seed=seed + 2, heads=4, head_dim=8)
    pipe = AuraFlowPipeline(tokenizer=tiny_text_encoders.t5_tokenizer(512), text_encoder=umt5,
                            vae=_kl_vae(seed + 3), transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler())

    def call_kwargs(steps: int, seed: int) -> dict:
        return dict(prompt=PROMPT, negative_prompt="dark", height=32, width=32, num_inference_steps=steps,
                    guidance_scale=4.0, max_sequence_length=ODD_TEXT_LENGTH, generator=_generator(seed),
                    output_type="pt")

    return pipe, call_kwargs, ("text_encoder", "vae")


def _images(out):
    return out[0] if isinstance(out, tuple) else out.images


def _parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def reference_only(kind: str, steps: int = 2):
    """One process, no diffpar: the image's shape and scale (a quick check that the tiny pipeline runs)."""
    pipe, call_kwargs, _ = build(kind)
    with torch.no_grad():
        image = _images(pipe(**call_kwargs(steps, seed=0)))
    return {"shape": tuple(image.shape), "scale": image.abs().max().item()}


def _seed_global_rng(mode: str | None, rank: int):
    """Seed torch's global RNG: "same" 100 everywhere, "per-rank" 100 + rank (as separately seeded processes)."""
    if mode is not None:
        torch.manual_seed(100 + (rank if mode == "per-rank" else 0))


def pipeline_equivalence(kind: str, config: dict, steps: int = 2, rank_seeds: bool = True,
                         global_seed: str | None = None):
    """The image of one process vs the same pipeline on every rank, with every component of the kind's parallel
    list made parallel. Rank r passes generator seed r (when rank_seeds): diffpar's latent broadcast must make
    every rank use rank 0's noise. `global_seed` ("same" / "per-rank", see `_seed_global_rng`) seeds torch's global
    RNG before every call (the one-process one as rank 0), for pipelines that draw from it (no generator).

    Returns the image difference, whether ranks agree, the transformer's SplitProbe summaries, the VAE's split and
    whole call counts, and each text encoder's parameter count on this rank before and after."""
    reference_pipe, call_kwargs, names = build(kind)
    _seed_global_rng(global_seed, rank=0)
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = _images(reference_pipe(**call_kwargs(steps, seed=0)))
    del reference_pipe
    pipe, call_kwargs, names = build(kind)
    encoders_before = {n: _parameter_count(getattr(pipe, n)) for n in names if n.startswith("text_encoder")}
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
        **config, extra_parallel_modules=[getattr(pipe, n) for n in names], vae_split_min_rows=0))
    seed = dist.get_rank() if rank_seeds else 0
    try:
        encoders = {n: {"before": count, "after": _parameter_count(getattr(pipe, n))}
                    for n, count in encoders_before.items()}
        with torch.no_grad():
            _seed_global_rng(global_seed, dist.get_rank())
            with SplitProbe(pipe.transformer) as probe:
                out = _images(pipe(**call_kwargs(steps, seed=seed)))
            _seed_global_rng(global_seed, dist.get_rank())
            again = _images(pipe(**call_kwargs(steps, seed=seed)))
        vae_calls = split_calls(handle, "vae", names)
        step_names = list(handle.step_names)
    finally:
        problems = handle.detach(strict=False)  # also on error: no shim may outlive the test
    return image_report(out, again, reference, probe, reference_probe,
                        vae_calls=vae_calls, text_encoders=encoders, steps=step_names, detach_problems=problems)
