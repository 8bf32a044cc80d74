"""Tiny seeded text encoders shaped like the real ones, their inputs, and locally built tokenizers.

`build(name, attn="sdpa", seed=0, **overrides)` returns (model, make_inputs); `make_inputs(batch=2, seq=11,
pad=True)` gives `input_ids` and an `attention_mask` whose later rows are right-padded. Shapes keep what matters
for sharding: grouped-query ratios (Llama 3: 4 query heads per KV head, Gemma: one KV head, Qwen2.5-VL-7B: 7
per KV head), head_dim different from hidden/heads (Gemma, Qwen3), gated MLPs, T5's relu and gated-gelu
feed-forwards, odd MLP widths (uneven splits), per-head q/k norms, sliding windows, soft-capping, partial
rotary (GLM), fused gate_up (GLM). Every model runs in milliseconds on one CPU core.

`t5_tokenizer()` / `clip_tokenizer()` build T5 and CLIP tokenizers in memory (no Hub) for pipeline tests.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

BUILDERS: dict[str, Callable] = {}
VOCAB = 96


def builder(name):
    def deco(fn):
        BUILDERS[name] = fn
        return fn

    return deco


def _quiet():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*was not found in config.*")


def build(name: str, attn: str = "sdpa", seed: int = 0, **overrides):
    """(model, make_inputs) for the tiny encoder `name` with attention implementation `attn`."""
    _quiet()
    torch.manual_seed(seed)
    cls, config = BUILDERS[name](**overrides)
    model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    # Random init leaves some norms at exactly 1/0: perturb every parameter so no layer is trivially symmetric.
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    model.eval()

    def make_inputs(batch: int = 2, seq: int = 11, pad: bool = True, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, VOCAB - 1, (batch, seq), generator=gen)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad:
            for row in range(1, batch):  # row i loses 2*i tokens at the end (right padding)
                keep = max(1, seq - 2 * row)
                mask[row, keep:] = 0
                ids[row, keep:] = 0
        return {"input_ids": ids, "attention_mask": mask}

    return model, make_inputs


# -- encoders without a transformers TP plan ------------------------------------------------------------------
def _t5_family(model_class, config_class, feed_forward: str, heads, d_kv, d_model, d_ff, layers, vocab):
    """A T5-family encoder (T5, UMT5) with the tiny shared settings: 8 relative-position buckets, no dropout."""
    return model_class, config_class(
        vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj=feed_forward,
        dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


@builder("t5")
def _t5(heads=4, d_kv=8, d_model=32, d_ff=37, layers=2, vocab=VOCAB):
    """T5 v1.0 style: relu feed-forward, relative-position bias in layer 0 only."""
    from transformers import T5Config, T5EncoderModel

    return _t5_family(T5EncoderModel, T5Config, "relu", heads, d_kv, d_model, d_ff, layers, vocab)


@builder("t5-gated")
def _t5_gated(heads=6, d_kv=8, d_model=48, d_ff=61, layers=2, vocab=VOCAB):
    """T5 v1.1 / T5-XXL style (Flux, SD3): gated-gelu feed-forward; 6 heads split unevenly on 4 ranks."""
    from transformers import T5Config, T5EncoderModel

    return _t5_family(T5EncoderModel, T5Config, "gated-gelu", heads, d_kv, d_model, d_ff, layers, vocab)


@builder("umt5")
def _umt5(heads=4, d_kv=8, d_model=32, d_ff=48, layers=2, vocab=VOCAB):
    """UMT5 (Wan): gated-gelu, a relative-position bias table in every layer."""
    from transformers import UMT5Config, UMT5EncoderModel

    return _t5_family(UMT5EncoderModel, UMT5Config, "gated-gelu", heads, d_kv, d_model, d_ff, layers, vocab)


def _clip_config(heads, hidden, intermediate, layers, projection_dim=None, max_positions=16):
    from transformers import CLIPTextConfig

    kw = {"projection_dim": projection_dim} if projection_dim else {}
    return CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=heads, intermediate_size=intermediate,
        num_hidden_layers=layers, max_position_embeddings=max_positions, hidden_act="quick_gelu",
        # eos_token_id=2: the original CLIP checkpoints' value, which pools at the largest token id (the EOS).
        bos_token_id=1, eos_token_id=2, pad_token_id=1, **kw,
    )


@builder("clip")
def _clip(heads=4, hidden=32, intermediate=37, layers=2, max_positions=16):
    """CLIP-L style text tower (Flux, SD3, SDXL): causal mask, pooled at the EOS token."""
    from transformers import CLIPTextModel

    return CLIPTextModel, _clip_config(heads, hidden, intermediate, layers, max_positions=max_positions)


@builder("clip-projection")
def _clip_projection(heads=5, hidden=40, intermediate=70, layers=2, max_positions=16):
    """CLIP-G style with projection (SD3, SDXL's text_encoder_2); 5 heads: uneven on 2 and 4 ranks."""
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection, _clip_config(heads, hidden, intermediate, layers, projection_dim=24,
                                                     max_positions=max_positions)


# -- decoders with a transformers TP plan ---------------------------------------------------------------------
def _decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers):
    return dict(
        vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, intermediate_size=intermediate, num_hidden_layers=layers, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )


@builder("llama")
def _llama(heads=8, kv_heads=2, head_dim=8, hidden=64, intermediate=96, layers=2):
    """Llama 3 style GQA (4 query heads per KV head): 2 KV heads on 4 ranks are replicated."""
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel, LlamaConfig(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers))


@builder("gemma")
def _gemma(heads=4, kv_heads=1, head_dim=16, hidden=32, intermediate=48, layers=2):
    """Gemma-2B style multi-query attention (one KV head), head_dim != hidden / heads."""
    from transformers import GemmaConfig, GemmaModel

    return GemmaModel, GemmaConfig(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers))


@builder("gemma2")
def _gemma2(heads=8, kv_heads=4, head_dim=8, hidden=32, intermediate=48, layers=2):
    """Gemma 2 (Sana, Lumina 2): soft-capped logits, alternating sliding-window layers."""
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model, Gemma2Config(
        **_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers),
        sliding_window=4, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=head_dim,
    )


def _gemma3_text_config(heads, kv_heads, head_dim, hidden, intermediate, layers):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers),
        sliding_window=4, query_pre_attn_scalar=head_dim,
    )


@builder("gemma3")
def _gemma3(heads=8, kv_heads=4, head_dim=8, hidden=32, intermediate=48, layers=2):
    """Gemma 3 text stack: per-head q/k RMSNorms, sliding windows."""
    from transformers import Gemma3TextModel

    return Gemma3TextModel, _gemma3_text_config(heads, kv_heads, head_dim, hidden, intermediate, layers)


@builder("gemma3-multimodal")
def _gemma3_multimodal(heads=8, kv_heads=4, head_dim=8, hidden=32, intermediate=48, layers=2):
    """Gemma3ForConditionalGeneration (LTX-2): the Gemma 3 text stack beside a SigLIP vision tower."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=4)
    return Gemma3ForConditionalGeneration, Gemma3Config(
        text_config=_gemma3_text_config(heads, kv_heads, head_dim, hidden, intermediate, layers),
        vision_config=vision, mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2,
        eoi_token_index=VOCAB - 3,
    )


@builder("mistral")
def _mistral(heads=8, kv_heads=2, head_dim=8, hidden=64, intermediate=96, layers=2):
    from transformers import MistralConfig, MistralModel

    return MistralModel, MistralConfig(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers))


@builder("ministral3")
def _ministral3(heads=8, kv_heads=2, head_dim=8, hidden=64, intermediate=96, layers=2):
    from transformers import Ministral3Config, Ministral3Model

    return Ministral3Model, Ministral3Config(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers))


@builder("mistral3")
def _mistral3(heads=8, kv_heads=2, head_dim=8, hidden=64, intermediate=96, layers=2):
    """Mistral3ForConditionalGeneration (Flux.2): a Mistral text stack beside a Pixtral vision tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers))
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=16, image_size=32, patch_size=8)
    return Mistral3ForConditionalGeneration, Mistral3Config(
        text_config=text, vision_config=vision, image_token_index=VOCAB - 1, spatial_merge_size=2,
    )


@builder("qwen3")
def _qwen3(heads=8, kv_heads=2, head_dim=16, hidden=64, intermediate=96, layers=2):
    """Qwen3ForCausalLM (Z-Image, Flux.2 Klein): q/k norms, head_dim != hidden / heads."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM, Qwen3Config(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers))


@builder("qwen2_5_vl")
def _qwen2_5_vl(heads=7, kv_heads=1, hidden=56, intermediate=90, layers=2):
    """Qwen2_5_VLForConditionalGeneration (QwenImage): 7 query heads per KV head like Qwen2.5-VL-7B (28/4):
    uneven on 2 and 4 ranks, the KV head replicated. The vision tower stays whole."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = hidden // heads
    text = dict(
        vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
        intermediate_size=intermediate, num_hidden_layers=layers, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, head_dim // 2 - 2]},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=hidden, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, fullatt_block_indexes=[0], window_size=4)
    return Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3, tie_word_embeddings=False,
    )


@builder("glm")
def _glm(heads=8, kv_heads=2, head_dim=8, hidden=64, intermediate=96, layers=2):
    """GLM (CogView4): fused gate_up_proj chunked in two, partial rotary."""
    from transformers import GlmConfig, GlmModel

    return GlmModel, GlmConfig(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers),
                               partial_rotary_factor=0.5)


@builder("glm4")
def _glm4(heads=8, kv_heads=2, head_dim=8, hidden=64, intermediate=96, layers=2):
    from transformers import Glm4Config, Glm4Model

    return Glm4Model, Glm4Config(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers),
                                 partial_rotary_factor=0.5)


@builder("qwen3_vl")
def _qwen3_vl(heads=8, kv_heads=2, head_dim=8, hidden=64, intermediate=96, layers=2):
    """Qwen3VLForConditionalGeneration (QwenImage 2.1, Krea 2, JoyImage): per-head q/k norms, interleaved MRoPE;
    the vision tower stays whole."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=hidden, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, deepstack_visual_indexes=[])
    return Qwen3VLForConditionalGeneration, Qwen3VLConfig(
        text_config=text, vision_config=vision, image_token_id=VOCAB - 1, video_token_id=VOCAB - 2,
        vision_start_token_id=VOCAB - 3, vision_end_token_id=VOCAB - 4, tie_word_embeddings=False,
    )


@builder("smollm3")
def _smollm3(heads=8, kv_heads=2, head_dim=8, hidden=64, intermediate=96, layers=2):
    """SmolLM3 (Bria FIBO): GQA, no RoPE on some layers."""
    from transformers import SmolLM3Config, SmolLM3Model

    kwargs = _decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers)
    kwargs.pop("head_dim")
    return SmolLM3Model, SmolLM3Config(**kwargs, no_rope_layer_interval=2)


@builder("t5gemma")
def _t5gemma(heads=8, kv_heads=2, head_dim=8, hidden=32, intermediate=48, layers=2):
    """T5GemmaEncoderModel (PRX, Motif-Video): bidirectional Gemma 2 layers, soft-capped logits."""
    from transformers import T5GemmaConfig, T5GemmaEncoderModel, T5GemmaModuleConfig

    module = T5GemmaModuleConfig(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers),
                                 sliding_window=4, query_pre_attn_scalar=head_dim)
    return T5GemmaEncoderModel, T5GemmaConfig(encoder=module, decoder=module, is_encoder_decoder=False,
                                              vocab_size=VOCAB)


@builder("llava")
def _llava(heads=8, kv_heads=2, head_dim=8, hidden=64, intermediate=96, layers=2):
    """LlavaForConditionalGeneration (HunyuanVideo image-to-video): a Llama language model beside a CLIP vision
    tower, which stays whole."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4, projection_dim=16)
    text = LlamaConfig(**_decoder_kwargs(heads, kv_heads, head_dim, hidden, intermediate, layers))
    return LlavaForConditionalGeneration, LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=VOCAB - 1)


FAMILIES = tuple(BUILDERS)


def supports_attention(name: str, attn: str) -> bool:
    """Whether transformers offers `attn` for this family (Gemma 2 is eager-only: its soft-capping)."""
    cls, _ = BUILDERS[name]()
    return attn != "sdpa" or bool(getattr(cls, "_supports_sdpa", True))


def encoder_outputs(model, inputs) -> dict[str, torch.Tensor]:
    """The tensors a pipeline reads from an encoder: last hidden state (and every hidden state), pooled / projected
    outputs where the class has them, logits of LM wrappers."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    tensors = {}
    if getattr(out, "last_hidden_state", None) is not None:
        tensors["last_hidden_state"] = out.last_hidden_state
    hidden = getattr(out, "hidden_states", None)
    if hidden:
        tensors["hidden_states[-1]"] = hidden[-1]
        tensors["hidden_states[-2]"] = hidden[-2]
    for key in ("pooler_output", "text_embeds", "logits"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            tensors[key] = value
    return tensors


# -- tokenizers, built in memory ------------------------------------------------------------------------------
_WORDS = ("a photo of cat dog red blue green small large tree house car sky river mountain city night day "
          "painting portrait astronaut horse riding on the moon in with and bright dark").split()


def t5_tokenizer(model_max_length: int = 512):
    """A T5 tokenizer (Unigram, sentencepiece-style) over a small word list; ids < 64."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - i * 0.01) for i, w in enumerate(_WORDS)]
    vocab += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def chat_tokenizer(model_max_length: int = 32):
    """The T5-style word tokenizer with a chat template, for pipelines that prompt a chat LM (Z-Image's Qwen3)."""
    tok = t5_tokenizer(model_max_length)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}{% endif %}"
    return tok


def clip_tokenizer(model_max_length: int = 16):
    """A CLIP BPE tokenizer over letters and a few merges; BOS/EOS are the two largest ids, like CLIP's."""
    from transformers import CLIPTokenizer

    vocab = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for w in ("at", "og", "ed", "ar"):
        merges.append((w[0], w[1] + "</w>"))
        vocab[w + "</w>"] = len(vocab)
    while len(vocab) < VOCAB - 2:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    vocab["<|startoftext|>"] = VOCAB - 2
    vocab["<|endoftext|>"] = VOCAB - 1
    return CLIPTokenizer(vocab=vocab, merges=merges, unk_token="<|endoftext|>", bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=model_max_length)
