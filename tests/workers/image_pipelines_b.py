"""Rank-side whole text-to-image pipelines (tests/test_image_pipelines_b.py): tiny seeded builds of HiDream-I1,
Hunyuan-DiT, CogView3-Plus, LongCat-Image, Ovis-Image, Bria and HunyuanImage 2.1 (every model from a config,
tokenizers in memory, no Hub), and one process vs `enable_cache(pipe, ...)` with the transformer context parallel,
every text encoder tensor parallel and the VAE split.

`KINDS[kind]` = (diffusers pipeline class name, builder, call arguments, pipeline components made parallel beside
the transformer). The same seed builds the same weights, so every rank and the one-process reference build their
own copies. Prompts are tokenized to an odd length (11; Hunyuan-DiT's fixed 77 and 256) so joint text + image
sequences split unevenly."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from diffpar.testing import tiny_text_encoders, tiny_transformers
from diffpar.testing.tiny_pipelines import tiny_image_vae
from diffpar.testing.tiny_transformers import rope_axes
from workers.end_to_end import against_one_process

PROMPT = "a red fox in snow"
TEXT_TOKENS = 11  # odd: the prompt's tokens do not divide over 2 ranks


class Kind(NamedTuple):
    pipeline_class: str
    build: Callable  # seed -> pipeline
    call: Callable  # () -> call arguments without generator and steps
    parallel: tuple[str, ...]  # components made parallel beside the transformer


KINDS: dict[str, Kind] = {}


def _kind(name: str, pipeline_class: str, call: Callable, parallel: tuple[str, ...]):
    def deco(fn):
        KINDS[name] = Kind(pipeline_class, fn, call, parallel)
        return fn

    return deco


def _encoder(name: str, seed: int, cls=None, **overrides):
    """tiny_text_encoders' encoder `name` (as `cls` where the pipeline holds a wrapper, e.g. ...ForCausalLM)."""
    if cls is None:
        return tiny_text_encoders.build(name, seed=seed, **overrides)[0]
    tiny_text_encoders._quiet()
    torch.manual_seed(seed)
    _, config = tiny_text_encoders.BUILDERS[name](**overrides)
    model = cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1000)  # no norm left at exactly 1 / 0 (as tiny_text_encoders.build)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    return model.eval()


def _image_call(**extra):
    return dict(prompt=PROMPT, height=32, width=32, max_sequence_length=TEXT_TOKENS, **extra)


# -- HiDream-I1 ------------------------------------------------------------------------------------------------
@_kind("hidream", "HiDreamImagePipeline", lambda: _image_call(guidance_scale=0.0),
       ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4", "vae"))
def _hidream(seed=0):
    """Two CLIP-with-projection towers (pooled), T5 and Llama 3 (every hidden layer feeds one transformer block);
    guidance 0 (HiDream-I1-Fast): one prompt batch."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaForCausalLM

    clip = _encoder("clip-projection", seed, heads=4, hidden=32, intermediate=37)
    clip_2 = _encoder("clip-projection", seed + 1, heads=4, hidden=32, intermediate=37)
    t5 = _encoder("t5-gated", seed + 2, heads=4, d_kv=8, d_model=32, d_ff=61)
    llama = _encoder("llama", seed + 3, cls=LlamaForCausalLM, layers=2)
    # tiny_models/hidream.py's block shapes at these encoders' widths: T5 32, Llama 64, pooled 2 x 24.
    torch.manual_seed(seed + 4)
    transformer = tiny_transformers.construct(
        HiDreamImageTransformer2DModel, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
        num_single_layers=1, attention_head_dim=8, num_attention_heads=4, caption_channels=[32, 64],
        text_emb_dim=48, num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32), llama_layers=[0, 1]).eval()
    vae = tiny_image_vae(seed + 5, shift_factor=0.1159, scaling_factor=0.3611)
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip, tokenizer=tiny_text_encoders.clip_tokenizer(16),
        text_encoder_2=clip_2, tokenizer_2=tiny_text_encoders.clip_tokenizer(16),
        text_encoder_3=t5, tokenizer_3=tiny_text_encoders.t5_tokenizer(512),
        text_encoder_4=llama, tokenizer_4=tiny_text_encoders.t5_tokenizer(512), transformer=transformer)
    # The pipeline rescales every request to the area of default_sample_size latents (128: 1024 px); 16: 32 px.
    pipe.default_sample_size = 16
    return pipe


# -- Hunyuan-DiT -----------------------------------------------------------------------------------------------
def _vae_8x(seed: int):
    """A four-block AutoencoderKL (8x down, 4 latent channels): pipelines that assume SD's VAE scale need it."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=0.13025).eval()


def _bert(seed: int):
    """A tiny BertModel (Hunyuan-DiT's bilingual CLIP text tower is a BERT)."""
    from transformers import BertConfig, BertModel

    tiny_text_encoders._quiet()
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tiny_text_encoders.VOCAB, hidden_size=32, num_attention_heads=4,
                        intermediate_size=37, num_hidden_layers=2, max_position_embeddings=80)
    return BertModel._from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def _bert_tokenizer():
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + PROMPT.split() + list("bcdefghijklmnopqrstuvwxyz")
    return BertTokenizer(vocab={w: i for i, w in enumerate(dict.fromkeys(words))}, model_max_length=77)


@_kind("hunyuan_dit", "HunyuanDiTPipeline",
       lambda: dict(prompt=PROMPT, height=64, width=64, use_resolution_binning=False),
       ("text_encoder", "text_encoder_2", "vae"))
def _hunyuan_dit(seed=0):
    """BERT and T5 prompts padded to the pipeline's fixed 77 (odd) and 256 tokens (the model learns one padding
    embedding per position: text_len 77, text_len_t5 256), classifier-free guidance (batch 2). 64 px: the pipeline sizes
    its RoPE grid as height // 8 // patch, so the VAE must be 8x (8 x 8 latents, 16 image tokens). The BERT and the T5 are
    both tensor parallel (families/text_encoders/bert.py pairs BERT's sibling output modules)."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline

    bert = _bert(seed)
    t5 = _encoder("t5-gated", seed + 1, heads=4, d_kv=8, d_model=32, d_ff=61)
    torch.manual_seed(seed + 2)  # tiny_models/hunyuan_dit.py's blocks, at these prompt lengths and widths
    transformer = tiny_transformers.construct(
        HunyuanDiT2DModel, sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, hidden_size=32, cross_attention_dim=32, cross_attention_dim_t5=32,
        pooled_projection_dim=8, text_len=77, text_len_t5=256, activation_fn="gelu-approximate",
        use_style_cond_and_image_meta_size=False).eval()
    return HunyuanDiTPipeline(
        vae=_vae_8x(seed + 3), text_encoder=bert, tokenizer=_bert_tokenizer(), transformer=transformer,
        scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        text_encoder_2=t5, tokenizer_2=tiny_text_encoders.t5_tokenizer(512))


# -- CogView3-Plus ----------------------------------------------------------------------------------------------
@_kind("cogview3plus", "CogView3PlusPipeline", _image_call, ("text_encoder", "vae"))
def _cogview3plus(seed=0):
    """T5 (11 tokens), classifier-free guidance (batch 2); 64 image tokens joined with the text in every block."""
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    t5 = _encoder("t5-gated", seed, heads=4, d_kv=8, d_model=32, d_ff=61)
    torch.manual_seed(seed + 1)  # tiny_models/cogview3plus.py's blocks at T5's width
    transformer = tiny_transformers.construct(
        CogView3PlusTransformer2DModel, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, out_channels=4, text_embed_dim=32, time_embed_dim=16, condition_dim=4,
        pos_embed_max_size=20, sample_size=16).eval()
    vae = tiny_image_vae(seed + 2, shift_factor=0.0, scaling_factor=1.0)
    return CogView3PlusPipeline(tokenizer=tiny_text_encoders.t5_tokenizer(512), text_encoder=t5, vae=vae,
                                transformer=transformer, scheduler=CogVideoXDDIMScheduler())


def _vae_16_channels(seed: int):
    """A two-block AutoencoderKL with 16 latent channels (pipelines that hard-code Flux's latent channels)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035).eval()


# -- LongCat-Image ----------------------------------------------------------------------------------------------
@_kind("longcat_image", "LongCatImagePipeline",
       lambda: dict(prompt=PROMPT, height=32, width=32, enable_prompt_rewrite=False), ("text_encoder", "vae"))
def _longcat_image(seed=0):
    """The pipeline fixes 16 latent channels (64 packed). Qwen2.5-VL (its language model tensor parallel, vision tower
    whole) reading the chat-templated prompt padded to 11 tokens; no prompt rewrite (that generates text with the
    Qwen2-VL processor: none here)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LongCatImagePipeline, LongCatImageTransformer2DModel

    from diffpar.testing.tiny_image_pipelines import qwen_vl_tokenizer

    qwen = _encoder("qwen2_5_vl", seed)
    torch.manual_seed(seed + 1)  # tiny_models/longcat_image.py's blocks at Qwen's width
    transformer = tiny_transformers.construct(
        LongCatImageTransformer2DModel, patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=qwen.config.text_config.hidden_size,
        pooled_projection_dim=32, axes_dims_rope=list(rope_axes(16))).eval()
    vae = _vae_16_channels(seed + 2)
    pipe = LongCatImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=qwen,
                                tokenizer=qwen_vl_tokenizer(), text_processor=None, transformer=transformer)
    pipe.tokenizer_max_length = TEXT_TOKENS  # the prompt's padded length (512 in the release)
    return pipe


# -- Ovis-Image -------------------------------------------------------------------------------------------------
@_kind("ovis_image", "OvisImagePipeline", _image_call, ("text_encoder", "vae"))
def _ovis_image(seed=0):
    """Qwen3 (the bare Qwen3Model) over the chat-templated prompt; the pipeline drops the template's first 28
    tokens and keeps max_sequence_length (11) after them. Classifier-free guidance (batch 2)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel
    from transformers import Qwen3Model

    qwen = _encoder("qwen3", seed, cls=Qwen3Model)
    torch.manual_seed(seed + 1)  # tiny_models/ovis_image.py's blocks at Qwen3's width
    transformer = tiny_transformers.construct(
        OvisImageTransformer2DModel, patch_size=1, in_channels=16, out_channels=16, num_layers=1,
        num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=qwen.config.hidden_size, axes_dims_rope=rope_axes(16)).eval()
    vae = tiny_image_vae(seed + 2, shift_factor=0.0609, scaling_factor=1.5035)
    return OvisImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=qwen,
                             tokenizer=tiny_text_encoders.chat_tokenizer(512), transformer=transformer)


# -- Bria -------------------------------------------------------------------------------------------------------
@_kind("bria", "BriaPipeline", _image_call, ("text_encoder", "vae"))
def _bria(seed=0):
    """T5 (11 tokens), classifier-free guidance (batch 2), FLUX.1-style blocks over 64 packed image tokens."""
    from diffusers import BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    t5 = _encoder("t5-gated", seed, heads=4, d_kv=8, d_model=32, d_ff=61)
    torch.manual_seed(seed + 1)  # tiny_models/bria.py's blocks
    transformer = tiny_transformers.construct(
        BriaTransformer2DModel, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32, axes_dims_rope=list(rope_axes(16))).eval()
    vae = tiny_image_vae(seed + 2, shift_factor=0.0, scaling_factor=0.3611)
    return BriaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=t5, tokenizer=tiny_text_encoders.t5_tokenizer(512))


# -- HunyuanImage 2.1 -------------------------------------------------------------------------------------------
GLYPH_PROMPT = 'a red fox in snow holding a sign "hi"'  # the quoted text goes through ByT5 (glyph prompt)


@_kind("hunyuan_image", "HunyuanImagePipeline", lambda: dict(prompt=GLYPH_PROMPT, height=32, width=32),
       ("text_encoder", "text_encoder_2", "vae"))
def _hunyuan_image(seed=0):
    """Qwen2.5-VL (language model tensor parallel) over a short chat template, 11 prompt tokens after it, and a
    ByT5 (T5 over bytes) for the quoted glyph text; no guider (the distilled setting: one batch). The VAE is
    HunyuanImage's own (4x here, 8 x 8 latents: 64 image tokens)."""
    from diffusers import (AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline,
                           HunyuanImageTransformer2DModel)
    from transformers import ByT5Tokenizer

    from diffpar.testing.tiny_image_pipelines import qwen_vl_tokenizer

    qwen = _encoder("qwen2_5_vl", seed)
    byt5_tokenizer = ByT5Tokenizer()
    byt5 = _encoder("t5-gated", seed + 1, heads=4, d_kv=8, d_model=32, d_ff=61, vocab=len(byt5_tokenizer))
    torch.manual_seed(seed + 2)  # tiny_models/hunyuan_image.py's blocks at these encoders' widths
    transformer = tiny_transformers.construct(
        HunyuanImageTransformer2DModel, in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16,
        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=(1, 1),
        text_embed_dim=qwen.config.text_config.hidden_size, text_embed_2_dim=32, rope_axes_dim=(8, 8)).eval()
    torch.manual_seed(seed + 3)  # tiny_vaes' "hunyuan_image" shape, with the release's latent scale
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
                                    layers_per_block=1, spatial_compression_ratio=4, sample_size=64,
                                    scaling_factor=0.75289)
    tokenizer = qwen_vl_tokenizer()
    pipe = HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae.eval(),
                                text_encoder=qwen, tokenizer=tokenizer, text_encoder_2=byt5,
                                tokenizer_2=byt5_tokenizer, transformer=transformer)
    # The release's template drops its first 34 tokens and keeps 1000 after them: here a short template whose
    # prefix is dropped, and the 11 tokens after it (the prompt, padded).
    pipe.prompt_template_encode = "<|im_start|>user {}<|im_end|>"
    pipe.prompt_template_encode_start_idx = len(tokenizer("<|im_start|>user", add_special_tokens=False).input_ids)
    pipe.tokenizer_max_length = TEXT_TOKENS
    pipe.tokenizer_2_max_length = TEXT_TOKENS
    return pipe


# -- the run ---------------------------------------------------------------------------------------------------
def build(kind: str, seed: int = 0):
    pipe = KINDS[kind].build(seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, kind: str, seed: int, steps: int):
    kwargs = KINDS[kind].call()
    kwargs.update(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    return pipe(**kwargs).images


def reference_run(kind: str, steps: int = 2):
    """One process, for checking a builder here (no world needed)."""
    pipe = build(kind)
    with torch.no_grad():
        return _images(pipe, kind, 0, steps)


def pipeline_equivalence(kind: str, config: dict, steps: int = 2, rank_seeds: bool = True):
    """The image of a parallel run vs one process, with SplitProbe summaries of the transformer ("split",
    "split_reference"), the VAE's split / whole encode and decode counts ("vae_calls") and each text encoder's
    share on this rank ("text_encoders"). Rank r passes generator seed r (when rank_seeds): diffpar's broadcasts
    must make every rank use rank 0's noise."""
    names = KINDS[kind].parallel
    runs = against_one_process(lambda: build(kind), lambda pipe, seed: _images(pipe, kind, seed, steps),
                               dict(config, vae_split_min_rows=0), names, seed=dist.get_rank() if rank_seeds else 0,
                               repeat=True)
    return runs.image_report()
