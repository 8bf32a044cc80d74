"""HunyuanVideo 1.5 (`HunyuanVideo15Transformer3DModel`): context- and tensor-parallel plans; diffusers ships
neither.

The forward refines the MLLM prompt (token refiner, whole on every rank: it pools over the prompt), projects the
ByT5 prompt and the image embedding, and packs the three per sample as [valid image, valid ByT5, valid MLLM,
padding...] with a key-padding mask (B, text). The plan splits the video tokens and that packed text where they
enter the first block, and the RoPE table as it leaves `rope`; gather after `proj_out`.

The mask is handled as in hunyuan_video.py (whose helpers this file uses):
1. Before the first block (a forward pre-hook, removed on detach) the packed text is cut to the tokens some
   sample still needs (`text_tokens_to_keep`: the longest valid length, rounded up to the Ulysses degree where a
   mask can still be applied). Padding sits at the end of every sample, so what is cut is masked for every query.
   With one prompt per call (the pipeline runs the conditional and unconditional passes separately) no padding
   remains, and no mask is needed: Ring and the uneven modes run too.
2. Each block's attention gets `HunyuanVideo15ContextParallelAttnProcessor`: the model's processor with attention
   through the dispatcher as before, but the mask is a key-padding mask laid out in the order Ulysses gathers keys
   ([video_0, text_0, video_1, text_1, ...]), or none when it masks nothing. The original also masks padded
   queries; those rows only produce padded text tokens, which no valid token reads and the output drops.
Prompts of different lengths in one batch need a mask, which Ring and the *_anything modes cannot apply: refused
with the reason, by `text_tokens_to_keep`.
"""
from __future__ import annotations

import torch

from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import joint_qkv
from diffpar.families.transformers.first_block_split import (
    cut_prompt_padding,
    first_block_split_plan,
    prepare_first_block_split,
)
from diffpar.families.transformers.hunyuan_video import mask_for_sharded_keys
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    DUAL_STREAM_BLOCK,
    TensorParallelPlan,
    present,
    register_tp_plan,
)


def _processor_class(kept: dict):
    """Built lazily: the dispatcher comes from the installed diffusers. `kept`: this call's whole video length and
    the text length after the cut (what the mask covers)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb

    class HunyuanVideo15ContextParallelAttnProcessor:
        _attention_backend = None
        _parallel_config = None

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            def heads(x):
                return x.unflatten(2, (attn.heads, -1))

            def rotate(query, key):
                if image_rotary_emb is None:
                    return query, key
                return (apply_rotary_emb(query, image_rotary_emb, sequence_dim=1),
                        apply_rotary_emb(key, image_rotary_emb, sequence_dim=1))

            query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, heads, text_first=False,
                                          rotate=rotate)

            mask = None
            if attention_mask is not None:
                text_total = kept["text_tokens"]
                text_mask = attention_mask[:, :text_total].bool()
                whole = torch.cat([text_mask.new_ones(text_mask.shape[0], kept["video_tokens"]), text_mask], dim=1)
                mask = whole[:, None, None, :]
                if self._parallel_config is not None:
                    mask = mask_for_sharded_keys(mask, hidden_states.shape[1], encoder_hidden_states.shape[1],
                                                 self._parallel_config, text_total)
                elif bool(mask.all()):
                    mask = None

            out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
            out = out.flatten(2, 3).to(query.dtype)
            text_tokens = encoder_hidden_states.shape[1]
            out, text_out = out[:, :-text_tokens], out[:, -text_tokens:]
            out = attn.to_out[1](attn.to_out[0](out))
            return out, attn.to_add_out(text_out)

    return HunyuanVideo15ContextParallelAttnProcessor


def prepare_hunyuan_video15(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

    kept: dict = {}
    prepare_first_block_split(model, handle, name, {HunyuanVideo15AttnProcessor2_0: _processor_class(kept)},
                              cut_prompt_padding(config, kept, "attention_mask", label="HunyuanVideo 1.5"))


@register_cp_plan("HunyuanVideo15Transformer3DModel", prepare=prepare_hunyuan_video15)
def hunyuan_video15_cp_plan(model) -> dict:
    return first_block_split_plan(model, "rope", rope_dims=2)


@register_tp_plan("HunyuanVideo15Transformer3DModel")
def _hunyuan_video15_tp(model) -> TensorParallelPlan:
    linears = present(model, DUAL_STREAM_BLOCK, "transformer_blocks")
    refiner = {
        "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "attn.to_out.0": "rowwise",
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise", "norm_out.linear": GATHER,
    }
    refiner_stack = "context_embedder.token_refiner.refiner_blocks"
    linears.update(present(model.context_embedder.token_refiner, refiner, "refiner_blocks"))
    linears = {(f"context_embedder.token_refiner.{k}" if k.startswith("refiner_blocks") else k): v
               for k, v in linears.items()}
    linears["norm_out.linear"] = GATHER
    # The ByT5 projection's 2048-wide hidden layer (8.4M weights whatever the model's width): split across ranks.
    linears["context_embedder_2.linear_1"] = "colwise"
    linears["context_embedder_2.linear_2"] = "rowwise"
    # qk-norm is an RMSNorm over each head's dim: per head, no all-reduce.
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"transformer_blocks.*.attn": ATTN_ATTRS, f"{refiner_stack}.*.attn": ATTN_ATTRS},
    )
