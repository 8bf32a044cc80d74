"""Tiny, seeded pipelines that run classifier-free guidance, each with the call arguments that switch it on.

`build(kind, **kwargs) -> (pipe, call_kwargs)`; `call_kwargs(guidance=True, batch=1, steps=2, seed=7)` returns
the pipeline arguments (prompt embeddings drawn from `seed`, so no text encoder is needed where the pipeline
accepts embeddings). Kinds and their guidance pattern:
- "sd3": StableDiffusion3Pipeline, branches batched (`torch.cat([latents] * 2)`), guidance_scale 4 (1: off);
- "flux": FluxPipeline with `true_cfg_scale` 2 and a negative prompt: cond and uncond calls;
- "qwenimage": QwenImagePipeline with `true_cfg_scale` 4 and negative embeddings: cond and uncond calls;
- "wan": WanPipeline with guidance_scale 5: cond and uncond calls;
- "wan22": WanPipeline with two experts (Wan 2.2: `transformer` above `boundary_ratio` 0.875 of the timesteps,
  `transformer_2`, the low-noise expert, below it; 4 steps give each expert 2), cond and uncond calls on each;
- "ltx" / "ltx_i2v": LTXPipeline / LTXImageToVideoPipeline with guidance_scale 3, branches batched.
Every call with the same arguments builds the same weights, so each rank and a one-process reference agree.
"""
from __future__ import annotations

import torch

from diffpar.testing import tiny_pipelines, tiny_transformers

KINDS = ("sd3", "flux", "qwenimage", "wan", "wan22", "ltx", "ltx_i2v")
VIDEO_KINDS = ("wan", "wan22", "ltx", "ltx_i2v")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def build(kind: str, **kwargs):
    if kind in ("ltx", "ltx_i2v"):
        return _ltx(image=kind == "ltx_i2v", **kwargs)
    return {"sd3": _sd3, "flux": _flux, "qwenimage": _qwenimage, "wan": _wan, "wan22": _wan22}[kind](**kwargs)


def _sd3(seed=0, heads=4, head_dim=16, layers=2):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed + 2)
    transformer, _ = tiny_transformers.build("sd3", heads=heads, head_dim=head_dim, layers=layers)
    vae = tiny_pipelines.tiny_image_vae(seed + 3, shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None,
    )

    def call_kwargs(guidance=True, batch=1, steps=2, seed=7, text=8, height=32, width=32):
        g = _gen(seed)
        return dict(
            prompt_embeds=torch.randn(batch, text, 32, generator=g),
            pooled_prompt_embeds=torch.randn(batch, 32, generator=g),
            negative_prompt_embeds=torch.randn(batch, text, 32, generator=g),
            negative_pooled_prompt_embeds=torch.randn(batch, 32, generator=g),
            height=height, width=width, num_inference_steps=steps, guidance_scale=4.0 if guidance else 1.0,
            output_type="pt", generator=torch.Generator().manual_seed(seed),
        )

    return pipe, call_kwargs


def _flux(seed=0, heads=4, **kwargs):
    pipe = tiny_pipelines.build_tiny_flux_pipeline(seed=seed, heads=heads, **kwargs)

    def call_kwargs(guidance=True, batch=1, steps=2, seed=7, height=32, width=32):
        prompts = [f"a red fox in snow {i}" for i in range(batch)]
        return dict(
            prompt=prompts, negative_prompt=["blurry"] * batch, true_cfg_scale=2.0 if guidance else 1.0,
            guidance_scale=3.5, height=height, width=width, num_inference_steps=steps, max_sequence_length=16,
            output_type="pt", generator=torch.Generator().manual_seed(seed),
        )

    return pipe, call_kwargs


def _qwenimage(seed=0, heads=4, head_dim=16, layers=2):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from diffpar.testing import tiny_vaes

    torch.manual_seed(seed + 2)
    transformer, _ = tiny_transformers.build("qwenimage", heads=heads, head_dim=head_dim, layers=layers)
    vae, _, _ = tiny_vaes.build("qwen", seed=seed + 3, temporal=(False, False))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None,
                             tokenizer=None, transformer=transformer.eval())

    def call_kwargs(guidance=True, batch=1, steps=2, seed=7, text=8, height=32, width=32):
        g = _gen(seed)
        return dict(
            prompt_embeds=torch.randn(batch, text, 32, generator=g),
            prompt_embeds_mask=torch.ones(batch, text, dtype=torch.long),
            negative_prompt_embeds=torch.randn(batch, text, 32, generator=g),
            negative_prompt_embeds_mask=torch.ones(batch, text, dtype=torch.long),
            true_cfg_scale=4.0 if guidance else 1.0, height=height, width=width, num_inference_steps=steps,
            output_type="pt", generator=torch.Generator().manual_seed(seed),
        )

    return pipe, call_kwargs


def _wan(seed=0, heads=4, **kwargs):
    pipe = tiny_pipelines.build_tiny_wan_pipeline(seed=seed, heads=heads, **kwargs)

    def call_kwargs(guidance=True, batch=1, steps=2, seed=7, height=32, width=32):
        return dict(
            prompt=[f"a red fox in snow {i}" for i in range(batch)], negative_prompt=["blurry"] * batch,
            guidance_scale=5.0 if guidance else 1.0, height=height, width=width, num_frames=5,
            num_inference_steps=steps, max_sequence_length=16, output_type="pt",
            generator=torch.Generator().manual_seed(seed),
        )

    return pipe, call_kwargs


def _wan22(seed=0, heads=4, **kwargs):
    from diffusers import WanPipeline

    one, call_kwargs = _wan(seed=seed, heads=heads, **kwargs)
    low_noise = tiny_pipelines.build_tiny_wan_pipeline(seed=seed + 10, heads=heads, **kwargs).transformer
    components = {k: v for k, v in one.components.items() if k != "transformer_2"}
    pipe = WanPipeline(**components, transformer_2=low_noise, boundary_ratio=0.875)
    return pipe, call_kwargs


def _ltx(seed=0, image=False):
    """The tiny LTX-Video pipeline of tiny_video_pipelines (T5, LTXVideoTransformer3DModel, LTX VAE); text-to-video
    from the same components, or image-to-video."""
    from diffusers import LTXPipeline

    from diffpar.testing import tiny_video_pipelines

    i2v = tiny_video_pipelines.build("ltx_i2v", seed=seed)
    pipe = i2v if image else LTXPipeline(**i2v.components)

    def call_kwargs(guidance=True, batch=1, steps=2, seed=7, height=32, width=32):
        extra = {"image": tiny_video_pipelines.conditioning_image(height, width)} if image else {}
        return dict(
            prompt=[f"a red fox in snow {i}" for i in range(batch)], negative_prompt=["blurry"] * batch,
            guidance_scale=3.0 if guidance else 1.0, height=height, width=width, num_frames=9,
            num_inference_steps=steps, max_sequence_length=16, output_type="pt",
            generator=torch.Generator().manual_seed(seed), **extra,
        )

    return pipe, call_kwargs


def images(kind: str, output) -> torch.Tensor:
    """The pipeline output as one tensor (frames for video pipelines)."""
    return output.frames if kind in VIDEO_KINDS else output.images
