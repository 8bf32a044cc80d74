"""Rank-side whole text-to-image pipelines of tests/test_image_pipelines_c.py (Krea 2, Qwen-Image 2.1, PRX,
Nucleus-MoE Image, ERNIE-Image, GLM-Image, FLUX.3 modular): each built tiny from local components (seeded random
weights, tokenizers built in memory), run in one process, then on every rank with the transformer context
parallel, the text encoder tensor parallel and the VAE split."""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from diffpar.testing import tiny_text_encoders, tiny_transformers, tiny_vaes
from workers.end_to_end import LatestBuild, against_one_process

PROMPT = "a red fox in snow"
BUILDERS: dict[str, Callable] = {}
# The pipeline components a whole-world run makes parallel beside the transformer (text encoders TP, VAE split).
PARALLEL_MODULES: dict[str, tuple[str, ...]] = {}


def builder(name: str, parallel_modules: tuple[str, ...]):
    def deco(fn):
        BUILDERS[name] = fn
        PARALLEL_MODULES[name] = parallel_modules
        return fn

    return deco


def build(kind: str, seed: int = 0):
    pipe, call_kwargs = BUILDERS[kind](seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe, call_kwargs


# -- Krea 2 ------------------------------------------------------------------------------------------------------
@builder("krea2", ("text_encoder", "vae"))
def _krea2(seed=0):
    """Krea2Pipeline: a Qwen3VLModel (2 layers, hidden 24: the tiny transformer's text_hidden_dim) whose three
    hidden states (embeddings and both layers) feed the transformer's 3-layer text fusion; the Qwen VAE (4x) and
    2 x 2 packing: a 32 px image is 16 image tokens, after 37 text tokens (max_sequence_length 14 plus the
    template suffix; odd) with classifier-free guidance."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    full, _ = tiny_text_encoders.build("qwen3_vl", seed=seed, hidden=24, intermediate=256)
    text_encoder = full.model  # Krea 2 takes the Qwen3VLModel, not the ForConditionalGeneration wrapper
    transformer, _ = tiny_transformers.build("krea2", seed=seed + 2)
    vae, _, _ = tiny_vaes.build("qwen", seed=seed + 3, temporal=(False, False))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=6400)
    pipe = Krea2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                         tokenizer=tiny_text_encoders.t5_tokenizer(1024), transformer=transformer,
                         text_encoder_select_layers=(0, 1, 2))

    def call_kwargs(steps=2, seed=0):
        return dict(prompt=PROMPT, height=32, width=32, num_inference_steps=steps, guidance_scale=2.0,
                    max_sequence_length=14, generator=torch.Generator().manual_seed(seed), output_type="pt")

    return pipe, call_kwargs


# -- Qwen-Image 2.1 ----------------------------------------------------------------------------------------------
class _ChatTextProcessor:
    """What the Qwen3-VL pipelines (QwenImage21, NucleusMoEImage) call of a Qwen3VLProcessor for a text-only prompt:
    `apply_chat_template` (Qwen's chat format), `tokenizer`, and `__call__(text=..., **tokenizer options)`. It
    stands in for transformers' Qwen3VLProcessor, whose video processor needs torchvision (not installed here)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def apply_chat_template(self, messages, tokenize=True, return_dict=False, add_generation_prompt=False):
        def text_of(content):
            return content if isinstance(content, str) else "".join(c["text"] for c in content)

        text = "".join(f"<|im_start|>{m['role']}\n{text_of(m['content'])}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return [self.tokenizer(text, add_special_tokens=False).input_ids] if tokenize else text

    def __call__(self, text, **options):
        return self.tokenizer(text, **options)


@builder("qwenimage21", ("text_encoder", "vae"))
def _qwenimage21(seed=0):
    """QwenImage21Pipeline (text to image): a Qwen3VLForConditionalGeneration (hidden 32: the tiny transformer's
    context_in_dim), a 16x Qwen-Image 2.1 VAE (4 downsamplings, z_dim 16 = the transformer's in_channels), latents
    unpatched: a 64 px image is 4 x 4 tokens (4 encoder slots) after the prompt's tokens; two steps, so the
    second runs from the text key/value cache the first step fills."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    from diffpar.testing.tiny_image_pipelines import qwen_vl_tokenizer

    text_encoder, _ = tiny_text_encoders.build("qwen3_vl", seed=seed, hidden=32, intermediate=256)
    transformer, _ = tiny_transformers.build("qwenimage21", seed=seed + 2)
    vae, _, _ = tiny_vaes.build("qwen21", seed=seed + 3, mult=(1, 1, 2, 2, 2), temporal=(False,) * 4, latent=16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    pipe = QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                               processor=_ChatTextProcessor(qwen_vl_tokenizer()), transformer=transformer)

    def call_kwargs(steps=2, seed=0):
        # this prompt is 31 tokens after the dropped system message: 31 + 16 image tokens, an odd sequence
        return dict(prompt="a red fox in the snow", height=64, width=64, num_inference_steps=steps,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    return pipe, call_kwargs


# -- Nucleus-MoE Image --------------------------------------------------------------------------------------------
@builder("nucleusmoe", ("text_encoder", "vae"))
def _nucleusmoe(seed=0):
    """NucleusMoEImagePipeline: a Qwen3VLForConditionalGeneration (3 layers, hidden 24: the tiny transformer's
    joint_attention_dim; the pipeline reads hidden_states[-2]), the Qwen VAE (4x) and 2 x 2 packing: a 24 x 40 px
    image is 3 x 5 = 15 image tokens (odd; the prompts are multiples of 8), classifier-free guidance;
    the transformer has one dense block and one with routed experts."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline,
                           NucleusMoEImageTransformer2DModel)

    from diffpar.testing.tiny_image_pipelines import qwen_vl_tokenizer

    text_encoder, _ = tiny_text_encoders.build("qwen3_vl", seed=seed, hidden=24, intermediate=256, layers=3)
    torch.manual_seed(seed + 2)
    # the tiny model of tiny_models/nucleusmoe.py, but predicting the 4 latent channels (out_channels defaults to
    # in_channels, which the pipeline reads as 4 latent channels packed 2 x 2)
    transformer = tiny_transformers.construct(
        NucleusMoEImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=4, num_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
        moe_enabled=True, dense_moe_strategy="leave_first_block_dense", num_experts=4, moe_intermediate_dim=32,
        capacity_factors=2.0,
    )
    with torch.no_grad():  # the routed experts are created uninitialized (torch.empty): seed them
        for name, p in transformer.named_parameters():
            if ".experts." in name:
                p.copy_(torch.randn(p.shape) * 0.1)
    vae, _, _ = tiny_vaes.build("qwen", seed=seed + 3, temporal=(False, False))
    pipe = NucleusMoEImagePipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   vae=vae, text_encoder=text_encoder,
                                   processor=_ChatTextProcessor(qwen_vl_tokenizer()))

    def call_kwargs(steps=2, seed=0):
        # The pipeline pads each prompt to a multiple of 8 tokens, and diffpar refuses a padded prompt on this
        # transformer (compat.diffusers_cp.guard_whole_text_mask): both prompts here fill whole multiples of 8
        # with the tiny tokenizer (264 and 256 tokens with the system message), so no mask is passed.
        return dict(prompt="red fox in snow", negative_prompt="a dark night", height=24, width=40,
                    num_inference_steps=steps, guidance_scale=2.0, return_index=-2,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    return pipe, call_kwargs


# -- PRX -------------------------------------------------------------------------------------------------------
@builder("prx", ("text_encoder", "vae"))
def _prx(seed=0):
    """PRXPipeline: the encoder stack of a T5Gemma (hidden 24: the tiny transformer's context_in_dim), a two-block
    AutoencoderKL (2x, 4 latent channels) and 2 x 2 patches: a 16 px image is 16 image tokens; a 15-token prompt
    (odd), classifier-free guidance (the negative and positive prompts in one batch of two)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PRXPipeline

    from diffpar.testing.tiny_pipelines import tiny_image_vae

    full, _ = tiny_text_encoders.build("t5gemma", attn="eager", seed=seed, hidden=24, intermediate=256)
    transformer, _ = tiny_transformers.build("prx", seed=seed + 2)
    vae = tiny_image_vae(seed + 3, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = PRXPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       text_encoder=full.encoder, tokenizer=tiny_text_encoders.t5_tokenizer(512), vae=vae)

    def call_kwargs(steps=2, seed=0):
        # resolution binning maps sizes onto the released model's 256+ px buckets: off for a 16 px image;
        # text cleaning off: it needs ftfy and bs4, absent here, and changes nothing in this prompt
        return dict(prompt=PROMPT, height=16, width=16, num_inference_steps=steps, guidance_scale=2.0,
                    tokenizer_max_length=15, use_resolution_binning=False, skip_text_cleaning=True,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    return pipe, call_kwargs


# -- ERNIE-Image -------------------------------------------------------------------------------------------------
@builder("ernie_image", ("text_encoder", "vae"))
def _ernie_image(seed=0):
    """ErnieImagePipeline without its prompt enhancer (pe=None): a Mistral3Model (hidden 24: the transformer's
    text_in_dim; the pipeline reads hidden_states[-2]), the Flux.2 VAE (4x, 4 latent channels) and 2 x 2
    patchify: a 40 x 24 px image is 5 x 3 = 15 image tokens (odd), classifier-free guidance with an empty
    negative prompt (a batch of two prompts of different lengths, padded with `text_lens`)."""
    from diffusers import ErnieImagePipeline, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler

    full, _ = tiny_text_encoders.build("mistral3", seed=seed, hidden=24, intermediate=256)
    torch.manual_seed(seed + 2)
    # the tiny model of tiny_models/ernie_image.py, with 16 channels in and out (4 latent channels patchified)
    transformer = tiny_transformers.construct(
        ErnieImageTransformer2DModel, hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64,
        in_channels=16, out_channels=16, patch_size=1, text_in_dim=24, rope_axes_dim=(4, 6, 6),
    )
    with torch.no_grad():  # the modulation and output layers start at zero in diffusers: seed them
        for p in (*transformer.adaLN_modulation.parameters(), *transformer.final_linear.parameters()):
            p.copy_(torch.randn(p.shape) * 0.1)
    vae, _, _ = tiny_vaes.build("flux2", seed=seed + 3)
    pipe = ErnieImagePipeline(transformer=transformer, vae=vae, text_encoder=full.model,
                              tokenizer=tiny_text_encoders.t5_tokenizer(512),
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))

    def call_kwargs(steps=2, seed=0):
        return dict(prompt=PROMPT, height=40, width=24, num_inference_steps=steps, guidance_scale=2.0, use_pe=False,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    return pipe, call_kwargs


# -- GLM-Image ---------------------------------------------------------------------------------------------------
def _byt5_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()  # bytes: no vocabulary file to load


@builder("glm_image", ("text_encoder", "vae"))
def _glm_image(seed=0):
    """GlmImagePipeline's diffusion decoder, given the prior tokens: the autoregressive GLM that writes them
    (vision_language_encoder) and its processor are left out (None), and each call passes `prior_token_ids`
    itself (one per image token, as `generate_prior_tokens` returns them). A T5 glyph encoder (d_model 24: the
    transformer's text_embed_dim) reads the prompt's quoted text with a ByT5 tokenizer; a 3-block AutoencoderKL
    (4x, 4 latent channels) and 2 x 2 patches: a 16 x 40 px image is 2 x 5 = 10 image tokens (even: heights come
    in multiples of 16, an even number of token rows) after 5 glyph tokens (the pipeline pads them to an odd
    count). No guidance by default: the unconditional call reads ONE glyph token (an empty negative prompt),
    which GLM-Image's plan cuts over the joint sequence [text, image] (test_glm_image_guidance_one_glyph_token)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, GlmImagePipeline

    t5, _ = tiny_text_encoders.build("t5", seed=seed, heads=4, d_kv=8, d_model=24, d_ff=256, layers=2, vocab=384)
    transformer, _ = tiny_transformers.build("glm_image", seed=seed + 2)
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, latents_mean=[0.1] * 4, latents_std=[1.5] * 4,
    ).eval()
    pipe = GlmImagePipeline(tokenizer=_byt5_tokenizer(), processor=None, text_encoder=t5,
                            vision_language_encoder=None, vae=vae, transformer=transformer,
                            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))

    def call_kwargs(steps=2, seed=0):
        prior = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(21))
        return dict(prompt='a red fox holding a sign that says "snow"', height=16, width=40,
                    num_inference_steps=steps, guidance_scale=1.0, prior_token_ids=prior,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    return pipe, call_kwargs


# -- FLUX.3 (a modular pipeline only) ----------------------------------------------------------------------------
@builder("flux3", ("text_encoder", "vae"))
def _flux3(seed=0):
    """Flux3ModularPipeline, the only FLUX.3 pipeline diffusers ships: Flux3AutoBlocks without its prompt upsampler
    (a Qwen 3.5 model that rewrites the prompt by generation), a Qwen3VLForConditionalGeneration (hidden 16; the
    call stacks hidden states 1 and 2: 32, the transformer's joint_attention_dim), the Flux.2 VAE (4x, then 2 x 2
    packing). A 40 x 24 px image is 5 x 3 = 15 image tokens (odd); the prompt is padded to 80 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux3AutoBlocks

    from diffpar.testing.tiny_image_pipelines import qwen_vl_tokenizer

    text_encoder, _ = tiny_text_encoders.build("qwen3_vl", seed=seed, hidden=16, intermediate=512)
    transformer, _ = tiny_transformers.build("flux3", seed=seed + 2)
    vae, _, _ = tiny_vaes.build("flux2", seed=seed + 3)
    blocks = Flux3AutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    pipe = blocks.init_pipeline()
    pipe.update_components(transformer=transformer, vae=vae, text_encoder=text_encoder,
                           tokenizer=_ChatTextProcessor(qwen_vl_tokenizer()),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))

    def call_kwargs(steps=2, seed=0):
        return dict(prompt=PROMPT, height=40, width=24, num_inference_steps=steps, text_encoder_out_layers=(1, 2),
                    generator=torch.Generator().manual_seed(seed), output="images", output_type="pt")

    return pipe, call_kwargs


# -- the run -----------------------------------------------------------------------------------------------------
def _images(out):
    if isinstance(out, torch.Tensor):  # a modular pipeline asked for output="images"
        return out
    return out[0] if isinstance(out, tuple) else out.images


def pipeline_equivalence(kind: str, config: dict, steps: int = 2, rank_seeds: bool = True,
                         call_overrides: dict | None = None):
    """The pipeline in one process, then the same (freshly built) pipeline with every module of
    PARALLEL_MODULES[kind] parallel. Rank r passes generator seed r (when rank_seeds): diffpar's broadcasts must
    make every rank use rank 0's noise. Returns the image difference, whether ranks agree, the transformer's
    SplitProbe summaries, the VAE's split/whole call counts and each text encoder's share. `call_overrides`:
    arguments that replace the builder's call arguments (both runs)."""
    overrides = dict(call_overrides or {})
    names = PARALLEL_MODULES[kind]
    latest = LatestBuild(lambda: build(kind))

    def run(pipe, seed):
        return _images(pipe(**{**latest.make_call(steps=steps, seed=seed), **overrides}))

    # one parallel call: no repeat
    runs = against_one_process(latest.build, run, config, names, seed=dist.get_rank() if rank_seeds else 0)
    return runs.image_report()
