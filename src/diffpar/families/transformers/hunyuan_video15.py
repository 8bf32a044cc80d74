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

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.hunyuan_video import mask_for_sharded_keys, text_tokens_to_keep
from diffpar.families.transformers.sd3 import replace_attention_processors
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    JOINT_ATTENTION,
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

            query = attn.norm_q(heads(attn.to_q(hidden_states)))
            key = attn.norm_k(heads(attn.to_k(hidden_states)))
            value = heads(attn.to_v(hidden_states))
            if image_rotary_emb is not None:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
            text_query = heads(attn.add_q_proj(encoder_hidden_states))
            text_key = heads(attn.add_k_proj(encoder_hidden_states))
            text_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_query = attn.norm_added_q(text_query)
            if attn.norm_added_k is not None:
                text_key = attn.norm_added_k(text_key)
            query = torch.cat([query, text_query], dim=1)
            key = torch.cat([key, text_key], dim=1)
            value = torch.cat([value, text_value], dim=1)

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


def _cut_text_padding(config, kept: dict):
    """Pre-hook of the first block, block(hidden_states, encoder_hidden_states, temb, attention_mask, rope): runs
    before the split hooks (it wraps the call, they wrap forward)."""

    def hook(module, args, kwargs):
        names = ("hidden_states", "encoder_hidden_states", "temb", "attention_mask")
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        mask = values.get("attention_mask")
        text = values["encoder_hidden_states"]
        keep = text.shape[1] if mask is None else text_tokens_to_keep(mask, config)
        kept["text_tokens"] = keep
        kept["video_tokens"] = values["hidden_states"].shape[1]
        if keep == text.shape[1]:
            return None
        if "encoder_hidden_states" in kwargs:
            kwargs = {**kwargs, "encoder_hidden_states": text[:, :keep]}
        else:
            args = (*args[:1], text[:, :keep], *args[2:])
        return args, kwargs

    return hook


def prepare_hunyuan_video15(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

    kept: dict = {}
    replace_attention_processors(model, {HunyuanVideo15AttnProcessor2_0: _processor_class(kept)}, handle, name,
                                 type(model).__name__, within=("transformer_blocks",))
    hooks = []
    handle.add(f"{name}: cut text padding before the first block", lambda: [h.remove() for h in hooks])
    hooks.append(model.transformer_blocks[0].register_forward_pre_hook(_cut_text_padding(config, kept),
                                                                       with_kwargs=True))


@register_cp_plan("HunyuanVideo15Transformer3DModel", prepare=prepare_hunyuan_video15)
def hunyuan_video15_cp_plan(model) -> dict:
    if not len(model.transformer_blocks):
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    tokens = split_input(split_dim=1, expected_dims=3)
    rope = split_input(split_dim=0, expected_dims=2, split_output=True)
    return {
        "rope": {0: rope, 1: rope},
        "transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("HunyuanVideo15Transformer3DModel")
def _hunyuan_video15_tp(model) -> TensorParallelPlan:
    block = {
        **JOINT_ATTENTION,
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
        "ff_context.net.0.proj": "colwise", "ff_context.net.2": "rowwise",
        "norm1.linear": GATHER, "norm1_context.linear": GATHER,
    }
    linears = present(model, block, "transformer_blocks")
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
