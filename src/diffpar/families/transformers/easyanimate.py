"""EasyAnimate (`EasyAnimateTransformer3DModel`): context- and tensor-parallel plans; diffusers ships none.

Joint attention over [prompt, video]: MMDiT blocks project the prompt with their own weights, plain blocks
concatenate it to the video and share the projections; RoPE on the video part only. The plan splits the video
tokens and the projected prompt where they enter the first block, the RoPE table as it leaves `rope_embedding`
(computed for the whole video); blocks work on [prompt shard, video shard] (their norms and feed-forwards are per
token); gather after `proj_out`.

Forward change, undone on detach: `EasyAnimateAttnProcessor2_0` calls `F.scaled_dot_product_attention` directly, so
each block's attention gets `EasyAnimateContextParallelAttnProcessor`, the same computation through diffusers'
dispatcher. The model passes no attention mask, so the order of keys across ranks does not matter.
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp import dispatch_attention
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import joint_qkv
from diffpar.families.transformers.first_block_split import first_block_split_plan, prepare_first_block_split
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, register_tp_plan


class EasyAnimateContextParallelAttnProcessor:
    """EasyAnimate's joint attention through `dispatch_attention_fn` with the parallel config."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise UnsupportedError("EasyAnimate with context parallelism: an attention_mask reached the joint "
                                   "attention (the model never passes one). Remove it.")
        text_tokens = encoder_hidden_states.shape[1]
        shared = attn.add_q_proj is None  # plain block: one set of projections over [prompt, video]
        if shared:
            hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        def heads(x):  # (B, S, H * D) -> (B, H, S, D), the original's layout for norms and RoPE
            return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        query, key, value = joint_qkv(attn, hidden_states, None if shared else encoder_hidden_states, heads,
                                      text_first=True, dim=2)
        if image_rotary_emb is not None:  # the video part, with this rank's rows of the table
            query[:, :, text_tokens:] = apply_rotary_emb(query[:, :, text_tokens:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_tokens:] = apply_rotary_emb(key[:, :, text_tokens:], image_rotary_emb)
        out = dispatch_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                 backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        text_out, out = out[:, :text_tokens], out[:, text_tokens:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out


def prepare_easyanimate(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_easyanimate import EasyAnimateAttnProcessor2_0

    prepare_first_block_split(model, handle, name,
                              {EasyAnimateAttnProcessor2_0: EasyAnimateContextParallelAttnProcessor})


@register_cp_plan("EasyAnimateTransformer3DModel", prepare=prepare_easyanimate)
def easyanimate_cp_plan(model) -> dict:
    return first_block_split_plan(model, "rope_embedding", rope_dims=2)


@register_tp_plan("EasyAnimateTransformer3DModel")
def _easyanimate_tp(model) -> TensorParallelPlan:
    linears, attrs = {}, {}
    for i, block in enumerate(model.transformer_blocks):
        # Listed per block: MMDiT blocks (own prompt projections and feed-forward) may be followed by plain ones.
        prefix = f"transformer_blocks.{i}"
        linears.update({
            f"{prefix}.ff.net.0.proj": "colwise", f"{prefix}.ff.net.2": "rowwise",
            f"{prefix}.norm1.linear": GATHER, f"{prefix}.norm2.linear": GATHER,
        })
        if block.attn1.add_q_proj is not None:
            linears.update({
                f"{prefix}.attn1.to_q": "colwise", f"{prefix}.attn1.to_k": "colwise",
                f"{prefix}.attn1.to_v": "colwise", f"{prefix}.attn1.to_out.0": "rowwise",
                f"{prefix}.attn1.add_q_proj": "colwise", f"{prefix}.attn1.add_k_proj": "colwise",
                f"{prefix}.attn1.add_v_proj": "colwise", f"{prefix}.attn1.to_add_out": "rowwise",
            })
            attrs[f"{prefix}.attn1"] = ATTN_ATTRS
        # A plain block's attention stays whole: it returns the prompt part of the attention output unprojected
        # (no to_add_out), so a rank holding some heads could not add it to the prompt stream.
        if block.txt_ff is not None:
            linears.update({f"{prefix}.txt_ff.net.0.proj": "colwise", f"{prefix}.txt_ff.net.2": "rowwise"})
    linears["norm_out.linear"] = GATHER
    # qk-norm is a LayerNorm over each head's dim: per head, no all-reduce.
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
