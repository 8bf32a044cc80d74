"""Rank-side whole image pipelines (tests/test_image_pipelines_e.py): Bria FIBO, Bria FIBO 2 (generating and
editing), JoyImage Edit and JoyImage Edit Plus. Each is built tiny here from local parts (seeded random weights, in-memory tokenizers) and
registered in tests/workers/image_pipelines_b.py's KINDS, whose `pipeline_equivalence` runs it in one process, then
on every rank under `enable_cache` with the transformer context parallel, every text encoder tensor parallel and the
VAE split (decode; the edit pipelines' input image encode too)."""
from __future__ import annotations

import torch

from diffpar.testing import tiny_text_encoders, tiny_vaes
from diffpar.testing.tiny_transformers import construct, rope_axes
from workers import image_pipelines_b
from workers.image_pipelines_b import KINDS, _encoder, _kind  # noqa: F401 (KINDS: the test reads it)

PROMPT = "a red fox in snow"  # 13 tokens with the tiny T5 tokenizer: odd


def _wan22_vae(seed: int, latent: int, mult=(1, 2, 2, 2)):
    """Wan 2.2's VAE (patchify 2): 16x spatially with four levels (FIBO assumes 16), one frame."""
    torch.manual_seed(seed)
    temporal = (False,) + (True,) * (len(mult) - 2)
    vae, _ = tiny_vaes.BUILDERS["wan22"](mult=mult, latent=latent, temporal=temporal)
    return vae.eval()


# -- Bria FIBO --------------------------------------------------------------------------------------------------
@_kind("bria_fibo", "BriaFiboPipeline",
       lambda: dict(prompt=PROMPT, negative_prompt="dark", height=64, width=64, guidance_scale=5.0),
       ("text_encoder", "vae"))
def _bria_fibo(seed=0):
    """SmolLM3 (its last two hidden states are the prompt, every hidden state feeds one block), classifier-free
    guidance as a batch of two with the shorter negative prompt masked, FLUX.1-style blocks over 4 x 4 = 16 image
    tokens (64 px through the 16x Wan 2.2 VAE): 13 + 16 tokens."""
    from diffusers import BriaFiboPipeline, BriaFiboTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import SmolLM3ForCausalLM

    smollm3 = _encoder("smollm3", seed, cls=SmolLM3ForCausalLM, heads=4, kv_heads=2, head_dim=8, hidden=32,
                       intermediate=48)
    torch.manual_seed(seed + 1)
    transformer = construct(
        BriaFiboTransformer2DModel, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, text_encoder_dim=32,
        axes_dims_rope=list(rope_axes(16))).eval()
    return BriaFiboPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                            vae=_wan22_vae(seed + 2, latent=16), text_encoder=smollm3,
                            tokenizer=tiny_text_encoders.t5_tokenizer(512))


pipeline_equivalence = image_pipelines_b.pipeline_equivalence
reference_run = image_pipelines_b.reference_run


# -- Bria FIBO 2 ------------------------------------------------------------------------------------------------
class _QwenChatTokenizerProcessor:
    """What BriaFibo2Pipeline calls of a Qwen3VLProcessor for a prompt without images: `processor(text=...,
    images=None, **tokenizer options)`. It stands in for transformers' Qwen3VLProcessor, whose video processor needs
    torchvision (not installed here)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text, images=None, **options):
        assert images is None, "this stand-in encodes text only"
        return self.tokenizer(text, **options)


@_kind("bria_fibo2", "BriaFibo2Pipeline",
       lambda: dict(prompt="a red fox in the snow", negative_prompt="dark", height=24, width=40, guidance_scale=4.0,
                    render_text_images=False),
       ("text_encoder", "vae"))
def _bria_fibo2(seed=0):
    """A Qwen3-VL encoder (3 layers; each of the transformer's two text inputs, the Perceiver's and the injection
    layer's, bundles three of its hidden states, as the real pipeline's six bundles of three), a Flux.2 VAE (4x, its
    BatchNorm statistics), 2 x 2 patches: 24 x 40 px is 3 x 5 = 15 image tokens (odd); the prompt (31 tokens in
    Qwen's chat template) and the negative (19) run as two passes."""
    from diffusers import BriaFibo2Pipeline, BriaFibo2Transformer2DModel, FlowMatchEulerDiscreteScheduler

    from diffpar.testing.tiny_image_pipelines import qwen_vl_tokenizer

    text_encoder, _ = tiny_text_encoders.build("qwen3_vl", seed=seed, hidden=32, intermediate=256, layers=3)
    torch.manual_seed(seed + 1)  # tiny_models/bria_fibo2.py's model, reading three 32-wide hidden states
    transformer = construct(
        BriaFibo2Transformer2DModel, in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        cap_feat_dim=96, injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4,
        max_num_gist_tokens=8, gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6),
        axes_lens=(64, 32, 32)).eval()
    torch.manual_seed(seed + 2)
    vae, _ = tiny_vaes.BUILDERS["flux2"]()
    g = torch.Generator().manual_seed(seed + 3)  # BatchNorm statistics away from the identity
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.1)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) + 0.5)
    pipe = BriaFibo2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                             vae=vae.eval(), text_encoder=text_encoder,
                             processor=_QwenChatTokenizerProcessor(qwen_vl_tokenizer()))
    pipe.text_encoder_out_layers = ((1, 2, 3), (0, 2, 3))  # the real ones name layers 5 to 35 of 36
    return pipe


# -- JoyImage Edit ----------------------------------------------------------------------------------------------
def _pil(height: int, width: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _caller_size_processor(pipe):
    """JoyImage's image processor, but keeping the caller's height and width: its buckets all hold about 1024 x 1024
    pixels (find_best_bucket), far beyond a tiny test."""
    from diffusers.pipelines.joyimage.image_processor import JoyImageEditImageProcessor

    class CallerSizeProcessor(JoyImageEditImageProcessor):
        def get_default_height_width(self, image, height=None, width=None):
            if height is None or width is None:  # (Edit Plus asks for each reference image's own size)
                step = 2 * self.config.vae_scale_factor  # whole 2 x 2 latent patches
                width, height = (size // step * step for size in image.size)
            return height, width

    return CallerSizeProcessor(vae_scale_factor=pipe.vae_scale_factor_spatial)


def _qwen3_vl_processor():
    """tiny_image_pipelines' text-and-image stand-in for a Qwen-VL processor, plus what Qwen3-VL's multimodal RoPE
    reads: `mm_token_type_ids` (1 on image tokens, 0 on text), as transformers' Qwen3VLProcessor returns it."""
    from diffpar.testing.tiny_image_pipelines import QwenVLTextImageProcessor, qwen_vl_processor

    class Qwen3VLTextImageProcessor(QwenVLTextImageProcessor):
        def __call__(self, text, images=None, padding=True, return_tensors="pt", max_length=None, truncation=False):
            # (max_length / truncation, which FIBO 2 passes, never bind here: the prompts are short)
            out = super().__call__(text, images=images, padding=padding, return_tensors=return_tensors)
            image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
            out["mm_token_type_ids"] = (out["input_ids"] == image_token_id).long()
            return out

    base = qwen_vl_processor()
    return Qwen3VLTextImageProcessor(base.tokenizer, base.image_processor)


def _joyimage_parts(seed: int, transformer_kind: str) -> dict:
    """A Qwen3-VL encoder (hidden 24: the tiny transformer's text_dim; its vision tower sees the image to edit through
    the processor's 2 x 2 pixel patches), a tiny JoyImage transformer (2 x 2 patches), Wan 2.1's VAE (8x: the
    pipeline reads scale_factor_spatial 8 from its config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffpar.testing import tiny_transformers
    # a wide MLP: the vision tower stays whole, and the sharded layers must still outweigh it
    text_encoder, _ = tiny_text_encoders.build("qwen3_vl", seed=seed, hidden=24, intermediate=512)
    torch.manual_seed(seed + 1)
    transformer, _ = tiny_transformers.build(transformer_kind, seed=seed + 1)
    torch.manual_seed(seed + 2)
    vae, _ = tiny_vaes.BUILDERS["wan"](mult=(1, 2, 2, 2), latent=4, temporal=(False, True, True))
    processor = _qwen3_vl_processor()
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(), text_encoder=text_encoder,
                tokenizer=processor.tokenizer, transformer=transformer.eval(), processor=processor)


def _edit_call(**extra):
    # JoyImage samples the encoded image's posterior from torch's global RNG (no generator): every call, in one
    # process and on every rank, seeds it alike first (this runs just before each call).
    torch.manual_seed(100)
    return dict(prompt="make the fox red", negative_prompt="dark", height=48, width=48, guidance_scale=4.0,
                **extra)


@_kind("joyimage_edit", "JoyImageEditPipeline", lambda: _edit_call(image=_pil(40, 56, 31)), ("text_encoder", "vae"))
def _joyimage_edit(seed=0):
    """JoyImageEditPipeline: the image to edit goes through the (split) VAE encode and, as 8 x 8 pixel patches,
    Qwen3-VL's vision tower; its latents and the noise make two items of 3 x 3 patches (48 px) each; guidance as
    two calls per step."""
    from diffusers import JoyImageEditPipeline

    pipe = JoyImageEditPipeline(**_joyimage_parts(seed, "joyimage"))
    pipe.vae_image_processor = _caller_size_processor(pipe)
    return pipe


# -- JoyImage Edit Plus -----------------------------------------------------------------------------------------
@_kind("joyimage_edit_plus", "JoyImageEditPlusPipeline",
       # the negative prompt has the prompt's token count: guidance batches the two unpadded (prompts of different
       # lengths, a padded prompt mask: tests/test_joyimage_padded.py)
       lambda: dict(images=[_pil(32, 48, 32), _pil(48, 32, 33)], prompt="make the cat red",
                    negative_prompt="make the cat dark", height=48, width=48, guidance_scale=4.0),
       ("text_encoder", "vae"))
def _joyimage_edit_plus(seed=0):
    """JoyImageEditPlusPipeline with two reference images of different shapes: each goes through the (split) VAE
    encode (its posterior's mode) and Qwen3-VL's vision tower; the target's 3 x 3 patches and the references' 2 x 3
    and 3 x 2 make 21 image tokens (odd); guidance as one batch of two."""
    from diffusers import JoyImageEditPlusPipeline

    pipe = JoyImageEditPlusPipeline(**_joyimage_parts(seed, "joyimage_edit_plus"))
    pipe.image_processor = _caller_size_processor(pipe)
    return pipe


# -- Bria FIBO 2, editing -----------------------------------------------------------------------------------------
@_kind("bria_fibo2_edit", "BriaFibo2Pipeline",
       lambda: dict(prompt="make the cat red", image=[_pil(24, 40, 34)], negative_prompt="dark", height=24, width=40,
                    guidance_scale=4.0, render_text_images=False),
       ("text_encoder", "vae"))
def _bria_fibo2_edit(seed=0):
    """BriaFibo2Pipeline editing one image: it goes through the (split) VAE encode (its posterior's mode) as the
    transformer's context latents, and through Qwen3-VL's vision tower with the edit prompt."""
    pipe = _bria_fibo2(seed)
    pipe.processor = _qwen3_vl_processor()
    return pipe
