"""Tiny, seeded, image-conditioned diffusers pipelines (edit, fill, img2img) for tests (no Hub access needed).

`build(kind, seed=0)` returns `(pipe, call_kwargs)`: `call_kwargs(seed=..., steps=2)` gives the arguments of one
valid 32 px call, including the input image(s) (and mask) as tensors in [0, 1], so the pipeline runs its VAE
*encode* on them. `PARALLEL_MODULES[kind]` names the pipeline components a whole-world run makes parallel
(text encoders tensor parallel, VAE split) beside the transformer. Every call with the same arguments builds the
same weights, so each rank (and a one-process reference) can build its own copy.
"""
from __future__ import annotations

from typing import Callable

import torch

from diffpar.testing import tiny_pipelines, tiny_text_encoders
from diffpar.testing.tiny_transformers import construct, rope_axes

BUILDERS: dict[str, Callable] = {}
PARALLEL_MODULES: dict[str, tuple[str, ...]] = {}
PROMPT = "a red fox in snow"


def builder(name: str, parallel_modules: tuple[str, ...]):
    def deco(fn):
        BUILDERS[name] = fn
        PARALLEL_MODULES[name] = parallel_modules
        return fn

    return deco


def build(kind: str, seed: int = 0, **overrides):
    pipe, call_kwargs = BUILDERS[kind](seed=seed, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call_kwargs


def _image(height: int, width: int, seed: int, batch: int = 1) -> torch.Tensor:
    """An RGB image batch in [0, 1] (what the pipelines' image processors accept as a tensor)."""
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def _mask(height: int, width: int) -> torch.Tensor:
    """A mask covering the lower-right quarter (1: repaint), so both split halves see masked and kept rows."""
    mask = torch.zeros(1, 1, height, width)
    mask[..., height // 2:, width // 2:] = 1.0
    return mask


# -- Flux.1 --------------------------------------------------------------------------------------------------
_FLUX_MODULES = ("text_encoder", "text_encoder_2", "vae")


def _flux_parts(seed: int, heads: int, pipeline_cls):
    """The tiny FluxPipeline's components (CLIP + T5 encoders, transformer, VAE, scheduler, tokenizers) that
    `pipeline_cls` takes; optional ones it takes beyond them (IP-Adapter image encoder) are None."""
    import inspect

    components = tiny_pipelines.build_tiny_flux_pipeline(seed=seed, heads=heads).components
    accepted = [p for p in inspect.signature(pipeline_cls.__init__).parameters if p != "self"]
    return {name: components.get(name) for name in accepted}


def _flux_call(steps=2, seed=0, height=32, width=32, **extra):
    return dict(prompt=PROMPT, height=height, width=width, num_inference_steps=steps, max_sequence_length=16,
                guidance_scale=3.5, generator=torch.Generator().manual_seed(seed), output_type="pt", **extra)


@builder("flux-kontext", _FLUX_MODULES)
def _flux_kontext(seed=0, heads=4):
    """FluxKontextPipeline: the input image's latents join the image tokens (64 + 64 at 32 px)."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**_flux_parts(seed, heads, FluxKontextPipeline))

    def call_kwargs(steps=2, seed=0, height=32, width=32):
        return _flux_call(steps, seed, height, width, image=_image(height, width, 11), _auto_resize=False,
                          max_area=height * width)  # the default (1024 ** 2) rescales the output to 1024 px

    return pipe, call_kwargs


@builder("flux-fill", _FLUX_MODULES)
def _flux_fill(seed=0, heads=4, head_dim=16):
    """FluxFillPipeline: the transformer takes noise (16) + masked-image latents (16) + packed mask (2*2*4 = 16)."""
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    parts = _flux_parts(seed, heads, FluxFillPipeline)
    torch.manual_seed(seed + 2)
    parts["transformer"] = FluxTransformer2DModel(
        patch_size=1, in_channels=48, out_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=rope_axes(head_dim),
    ).eval()
    pipe = FluxFillPipeline(**parts)

    def call_kwargs(steps=2, seed=0, height=32, width=32):
        return _flux_call(steps, seed, height, width, image=_image(height, width, 12),
                          mask_image=_mask(height, width))

    return pipe, call_kwargs


@builder("flux-img2img", _FLUX_MODULES)
def _flux_img2img(seed=0, heads=4):
    """FluxImg2ImgPipeline: the encoded image, noised to `strength`, is the starting latent."""
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline(**_flux_parts(seed, heads, FluxImg2ImgPipeline))

    def call_kwargs(steps=2, seed=0, height=32, width=32):
        # strength 0.5 of 2 * steps: `steps` denoising steps starting from a half-noised image (strength 1 would
        # start from pure noise, where the encoded image has no weight)
        return _flux_call(2 * steps, seed, height, width, image=_image(height, width, 13), strength=0.5)

    return pipe, call_kwargs


# -- Stable Diffusion 3 ----------------------------------------------------------------------------------------
@builder("sd3-img2img", ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"))
def _sd3_img2img(seed=0, heads=4, head_dim=16):
    """StableDiffusion3Img2ImgPipeline: CLIP-L and CLIG-G with projection (hidden 24 each, padded into T5's 64),
    a T5 (gated-gelu), an SD3.5-shaped transformer (dual attention in block 0), classifier-free guidance."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Img2ImgPipeline

    clip_kwargs = dict(attn="sdpa", heads=4, hidden=24, intermediate=37, layers=2, max_positions=16)
    clip_l, _ = tiny_text_encoders.build("clip-projection", seed=seed, **clip_kwargs)
    clip_g, _ = tiny_text_encoders.build("clip-projection", seed=seed + 1, **clip_kwargs)
    t5, _ = tiny_text_encoders.build("t5-gated", seed=seed + 4, heads=4, d_kv=8, d_model=64, d_ff=61, layers=2)
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=64, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * 24, pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()
    vae = tiny_pipelines.tiny_image_vae(seed + 3, shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3Img2ImgPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=tiny_text_encoders.clip_tokenizer(16),
        text_encoder_2=clip_g, tokenizer_2=tiny_text_encoders.clip_tokenizer(16),
        text_encoder_3=t5, tokenizer_3=tiny_text_encoders.t5_tokenizer(512),
    )

    def call_kwargs(steps=2, seed=0, height=32, width=32):
        # strength 0.5 of 2 * steps: `steps` denoising steps from a half-noised encoded image
        return dict(prompt=PROMPT, image=_image(height, width, 14), strength=0.5, height=height, width=width,
                    num_inference_steps=2 * steps, max_sequence_length=16, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    return pipe, call_kwargs


# -- Flux.2 ------------------------------------------------------------------------------------------------------
# Renders the user's text parts only, so a 16-token max_sequence_length holds the prompt, not the system message.
_USER_TEXT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{% for c in m['content'] %}"
                       "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}")


def _pil(height: int, width: int, seed: int):
    from PIL import Image

    pixels = (_image(height, width, seed)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels)


@builder("flux2-reference", ("text_encoder", "vae"))
def _flux2_reference(seed=0, heads=4, head_dim=16):
    """Flux2Pipeline with two reference images (64 px, the smallest it takes; each encoded by the VAE, their
    tokens appended to the image's).

    Its tokenizer is a T5-style word tokenizer with a chat template, not a PixtralProcessor: transformers'
    PixtralProcessor needs torchvision, which the test environment lacks, and for a text-only prompt the pipeline
    only calls `apply_chat_template`. The text encoder (Mistral3, 2 layers) gives 3 hidden states; the pipeline
    stacks all three (text_encoder_out_layers=(0, 1, 2)): joint_attention_dim = 3 * 64."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel

    from diffpar.testing import tiny_vaes

    mistral, _ = tiny_text_encoders.build("mistral3", seed=seed)
    tokenizer = tiny_text_encoders.t5_tokenizer(512)
    tokenizer.chat_template = _USER_TEXT_TEMPLATE
    torch.manual_seed(seed + 2)
    transformer = construct(  # guidance_embeds: newer releases only
        Flux2Transformer2DModel, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=3 * 64,
        timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    ).eval()
    # 4x scale, then 2 x 2 patches: the 32 px output is 4 x 4 tokens, each 64 px reference image 8 x 8 more
    vae, _, _ = tiny_vaes.build("flux2", seed=seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=mistral, tokenizer=tokenizer,
                         transformer=transformer)

    def call_kwargs(steps=2, seed=0, height=32, width=32):
        return dict(prompt=PROMPT, image=[_pil(64, 64, 15), _pil(64, 64, 16)], height=height,
                    width=width, num_inference_steps=steps, max_sequence_length=16, guidance_scale=4.0,
                    text_encoder_out_layers=(0, 1, 2), generator=torch.Generator().manual_seed(seed),
                    output_type="pt")

    return pipe, call_kwargs


# -- QwenImage ---------------------------------------------------------------------------------------------------
def _qwen_parts(seed: int, heads: int, head_dim: int):
    """Qwen2.5-VL text encoder (hidden 56), a QwenImage transformer reading it, a Qwen VAE (4x, 2 x 2 packing)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from diffpar.testing import tiny_vaes

    text_encoder, _ = tiny_text_encoders.build("qwen2_5_vl", seed=seed)
    torch.manual_seed(seed + 2)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_encoder.config.text_config.hidden_size,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    vae, _, _ = tiny_vaes.build("qwen", seed=seed + 3, temporal=(False, False))
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                transformer=transformer)


@builder("qwenimage-inpaint", ("text_encoder", "vae"))
def _qwenimage_inpaint(seed=0, heads=4, head_dim=16):
    """QwenImageInpaintPipeline: a tokenizer only (no processor); image and masked image go through VAE encode."""
    from diffusers import QwenImageInpaintPipeline

    pipe = QwenImageInpaintPipeline(tokenizer=tiny_text_encoders.t5_tokenizer(1024),
                                    **_qwen_parts(seed, heads, head_dim))

    def call_kwargs(steps=2, seed=0, height=32, width=32):
        return dict(prompt=PROMPT, image=_image(height, width, 17), mask_image=_mask(height, width), strength=0.5,
                    height=height, width=width, num_inference_steps=2 * steps, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    return pipe, call_kwargs


class QwenVLTextImageProcessor:
    """What the QwenImage edit pipelines call as `processor(text=..., images=..., padding=True, return_tensors="pt")`:
    Qwen2-VL's pixel patches and grid from `Qwen2VLImageProcessorPil`, each `<|image_pad|>` expanded to the image's
    token count, then the tokenizer. It stands in for transformers' Qwen2VLProcessor, whose constructor checks its
    video processor's class, which fails without torchvision (not installed here)."""

    image_token = "<|image_pad|>"

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def __call__(self, text, images=None, padding=True, return_tensors="pt"):
        from transformers import BatchFeature

        text = [text] if isinstance(text, str) else list(text)
        image_inputs = {}
        if images is not None:
            image_inputs = dict(self.image_processor(images=images, return_tensors=return_tensors))
            counts = iter((image_inputs["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist())
            expanded = []
            for t in text:
                while self.image_token in t:
                    t = t.replace(self.image_token, "<|placeholder|>" * next(counts), 1)
                expanded.append(t.replace("<|placeholder|>", self.image_token))
            text = expanded
        encoded = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        return BatchFeature({**encoded, **image_inputs})


def qwen_vl_tokenizer():
    """The T5-style word tokenizer with Qwen's chat and vision tokens as special tokens, at the ids the tiny
    Qwen2.5-VL encoder expects (vision start, video, image: the last three of its 96)."""
    from transformers import T5Tokenizer

    chat = ["<|im_start|>", "<|im_end|>", "<|vision_end|>"]
    vision = ["<|vision_start|>", "<|video_pad|>", "<|image_pad|>"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - i * 0.01) for i, w in enumerate(tiny_text_encoders._WORDS)]
    vocab += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [(s, 0.0) for s in chat]
    vocab += [(f"<unused{i}>", -20.0) for i in range(len(vocab), tiny_text_encoders.VOCAB - len(vision))]
    vocab += [(s, 0.0) for s in vision]
    return T5Tokenizer(vocab=vocab, extra_ids=0, additional_special_tokens=chat + vision, model_max_length=1024)


def qwen_vl_processor():
    from transformers import Qwen2VLImageProcessorPil

    # patch 2, no merge, one frame: the tiny encoder's vision tower; at most 16 x 16 px: 64 image tokens
    image_processor = Qwen2VLImageProcessorPil(patch_size=2, merge_size=1, temporal_patch_size=1, min_pixels=16,
                                               max_pixels=16 * 16)
    return QwenVLTextImageProcessor(qwen_vl_tokenizer(), image_processor)


@builder("qwenimage-edit", ("text_encoder", "vae"))
def _qwenimage_edit(seed=0, heads=4, head_dim=16):
    """QwenImageEditPipeline. It resizes the input image to 1024 x 1024 for the VAE, whatever the output size:
    a 16x VAE (4 downsamplings) keeps that at 32 x 32 latent tokens; the 64 px output is 2 x 2."""
    from diffusers import QwenImageEditPipeline

    from diffpar.testing import tiny_vaes

    parts = _qwen_parts(seed, heads, head_dim)
    parts["vae"], _, _ = tiny_vaes.build("qwen", seed=seed + 3, mult=(1, 1, 2, 2, 2), temporal=(False,) * 4)
    processor = qwen_vl_processor()
    pipe = QwenImageEditPipeline(tokenizer=processor.tokenizer, processor=processor, **parts)

    def call_kwargs(steps=2, seed=0, height=64, width=64):
        return dict(prompt=PROMPT, image=_pil(32, 32, 18), height=height, width=width, num_inference_steps=steps,
                    max_sequence_length=16, generator=torch.Generator().manual_seed(seed), output_type="pt")

    return pipe, call_kwargs


@builder("qwenimage-edit-plus", ("text_encoder", "vae"))
def _qwenimage_edit_plus(seed=0, heads=4, head_dim=16):
    """QwenImageEditPlusPipeline with two input images (each resized to 1024 x 1024 for the VAE: the 16x VAE of
    qwenimage-edit keeps each at 32 x 32 latent tokens)."""
    from diffusers import QwenImageEditPlusPipeline

    from diffpar.testing import tiny_vaes

    parts = _qwen_parts(seed, heads, head_dim)
    parts["vae"], _, _ = tiny_vaes.build("qwen", seed=seed + 3, mult=(1, 1, 2, 2, 2), temporal=(False,) * 4)
    processor = qwen_vl_processor()
    pipe = QwenImageEditPlusPipeline(tokenizer=processor.tokenizer, processor=processor, **parts)

    def call_kwargs(steps=2, seed=0, height=64, width=64):
        return dict(prompt=PROMPT, image=[_pil(32, 32, 19), _pil(32, 32, 20)], height=height, width=width,
                    num_inference_steps=steps, max_sequence_length=16, generator=torch.Generator().manual_seed(seed),
                    output_type="pt")

    return pipe, call_kwargs
