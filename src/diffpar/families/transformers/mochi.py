"""Mochi (`MochiTransformer3DModel`): context-parallel and tensor-parallel plans; diffusers ships neither.

Asymmetric joint attention: the video stream (3072 wide) and the prompt stream (1536 wide) share 24 heads. The
prompt's padding mask is the model input `encoder_attention_mask` (B, text), used whole by the caption pooler
(before the blocks) and passed to every block; diffusers' processor attends, per sample, over [video, that
sample's valid prompt tokens] and zeroes the padded prompt outputs.

Plan: split the video tokens and the projected prompt where they enter the first block, the RoPE table (tokens x
heads x head_dim/2) as it leaves `rope`; gather after `proj_out`. Two forward changes, undone on detach, as in
hunyuan_video.py (whose helpers this file uses):
1. A pre-hook on the first block cuts the prompt to the tokens some sample still needs (`text_tokens_to_keep`:
   the longest valid length, rounded up to the Ulysses degree where a mask can still be applied). With one prompt
   per call, or prompts of one length, no padding remains and no mask is needed: every mode runs.
2. Each block's attention gets `MochiContextParallelAttnProcessor`: the same projections, norms and RoPE, with
   attention over [video shard, prompt shard] through the dispatcher, and a key-padding mask laid out in Ulysses'
   gather order where padding remains. Padded prompt rows are not zeroed: no valid token reads them (they are
   masked keys) and the output is the video stream only.
The processor compacts each sample's valid prompt tokens to the front, so a prompt whose padding is not at its end
changes meaning with the layout: refused (diffusers' pipeline always pads at the end), as are prompts of different
lengths in one batch under Ring or the *_anything modes (no mask there).

TP plan: the joint attention by heads, both streams (q/k/v and the prompt's add_q/k/v_proj by columns, `to_out.0`
and `to_add_out` by rows); both SwiGLU feed-forwards by width (`net.0.proj` packs [value, gate]: split half by
half); the AdaLN modulation (`norm1.linear`, `norm1_context.linear` / `linear_1`, `norm_out.linear`) gathered. The
last block is `context_pre_only` (no `to_add_out`, no `ff_context`, a continuous norm for the prompt): its entries
are named block by block. The q/k norms (and norm_added_q/k) are RMSNorms over one head's width: replicated, each
rank normalises its own heads exactly. RoPE: `pos_frequencies` (3 x heads x head_dim/2) enters `rope` as
einsum("nd,dhf->nhf"), every head's frequencies independent of the others, so each rank keeping
`pos_frequencies[:, its heads, :]` (a head parameter along dim 1) computes exactly its heads' cos/sin tables, which
the processor applies to its heads. Per rank: `heads` (the processor reshapes with it).
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp import dispatch_attention
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import joint_qkv
from diffpar.families.transformers.first_block_split import (
    cut_prompt_padding,
    first_block_split_plan,
    prepare_first_block_split,
)
from diffpar.families.transformers.hunyuan_video import mask_for_sharded_keys
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan

def _rotate(x, cos, sin):
    """Mochi's RoPE on interleaved pairs (x: B, S, H, D; cos/sin: S, H, D/2)."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


def _processor_class(kept: dict):
    class MochiContextParallelAttnProcessor:
        _attention_backend = None
        _parallel_config = None

        def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
            def heads(x):
                return x.unflatten(2, (attn.heads, -1))

            def rotate(query, key):
                if image_rotary_emb is None:
                    return query, key
                return _rotate(query, *image_rotary_emb), _rotate(key, *image_rotary_emb)

            query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, heads, text_first=False,
                                          rotate=rotate)
            video_tokens, text_tokens = hidden_states.shape[1], encoder_hidden_states.shape[1]
            mask = None
            if attention_mask is not None:
                text_mask = attention_mask[:, :kept["text_tokens"]].bool()
                whole = torch.cat([text_mask.new_ones(text_mask.shape[0], kept["video_tokens"]), text_mask], dim=1)
                mask = mask_for_sharded_keys(whole[:, None, None, :], video_tokens, text_tokens,
                                             self._parallel_config, kept["text_tokens"])
            out = _attend(query, key, value, mask, self)
            out = out.flatten(2, 3).to(query.dtype)
            out, text_out = out.split_with_sizes((video_tokens, text_tokens), dim=1)
            out = attn.to_out[1](attn.to_out[0](out))
            if hasattr(attn, "to_add_out"):
                text_out = attn.to_add_out(text_out)
            return out, text_out

    return MochiContextParallelAttnProcessor


def _attend(query, key, value, mask, processor):
    if mask is None:
        return dispatch_attention(query, key, value, backend=processor._attention_backend,
                                  parallel_config=processor._parallel_config)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                 backend=processor._attention_backend, parallel_config=processor._parallel_config)


def _refuse_padding_before_real_tokens(mask) -> None:
    """Mochi's attention moves each prompt's real tokens to the front; only prompts padded at the end keep that
    order once the prompt is cut and split."""
    valid = mask.bool()
    counts = valid.sum(dim=1)
    at_start = torch.arange(valid.shape[1], device=valid.device)[None] < counts[:, None]
    if not torch.equal(valid, at_start):
        raise UnsupportedError(
            "Mochi with context parallelism: the prompt's attention mask has padding before real tokens. "
            "Mochi's attention moves each prompt's real tokens to the front, which a split prompt cannot "
            "reproduce. Pad prompts at the end (as the pipeline's tokenizer does)."
        )


def prepare_mochi(model, config, handle, name: str) -> None:
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    kept: dict = {}
    prepare_first_block_split(model, handle, name, {MochiAttnProcessor2_0: _processor_class(kept)},
                              cut_prompt_padding(config, kept, "encoder_attention_mask",
                                                 check_mask=_refuse_padding_before_real_tokens, label="Mochi"))


@register_cp_plan("MochiTransformer3DModel", prepare=prepare_mochi)
def mochi_cp_plan(model) -> dict:
    return first_block_split_plan(model, "rope", rope_dims=3)


def _swiglu(name: str, linear) -> dict:
    half = linear.out_features // 2  # SwiGLU: one projection packs [value, gate], chunked in two
    return {f"{name}.net.0.proj": Packed("colwise", (half, half)), f"{name}.net.2": "rowwise"}


@register_tp_plan("MochiTransformer3DModel")
def mochi_tp_plan(model) -> TensorParallelPlan:
    linears = {}
    for i, block in enumerate(model.transformer_blocks):
        prefix = f"transformer_blocks.{i}"
        entries = {f"attn1.{proj}": "colwise" for proj in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                            "add_v_proj")}
        entries["attn1.to_out.0"] = "rowwise"
        entries.update(_swiglu("ff", block.ff.net[0].proj))
        entries["norm1.linear"] = GATHER
        if block.context_pre_only:  # the last block: the prompt stream ends in attention (no output projection)
            entries["norm1_context.linear_1"] = GATHER
        else:
            entries["attn1.to_add_out"] = "rowwise"
            entries.update(_swiglu("ff_context", block.ff_context.net[0].proj))
            entries["norm1_context.linear"] = GATHER
        linears.update({f"{prefix}.{suffix}": style for suffix, style in entries.items()})
    linears["norm_out.linear"] = GATHER
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"transformer_blocks.*.attn1": ("heads",)},
        # One frequency set per head, applied to that head only: each rank keeps its heads (dim 1 of 3 x heads x f).
        head_parameters={"": ("pos_frequencies", "transformer_blocks.0.attn1", 1)},
    )
