"""Lumina-Next (`LuminaNextDiT2DModel`): context-parallel and tensor-parallel plans; diffusers ships neither.

CP plan: the image tokens are split entering `layers.0` and the RoPE table (the pipeline's whole 2-D table, cut
to the image by `patch_embedder`) at every layer (`patch_embedder` returns it in a tuple with a list, which
diffusers' hooks cannot split); gather after `norm_out`. Each block's self-attention (`attn1`) goes through
diffusers' dispatcher (`ContextParallelLuminaAttnProcessor`: the patch mask is all ones and is dropped; the
"proportional attention" scale takes the whole length from that mask); its cross-attention (`attn2`) attends from
the image shard to the whole prompt, with the prompt mask, locally.

TP plan: both attentions' q/k/v are split by heads (k/v by key/value heads, replicated on the ranks that share
one when they are fewer than the ranks); `attn1.to_out` is an Identity: the block adds the self-attention's and
the gate-scaled cross-attention's per-head outputs and projects the sum with `attn2.to_out[0]`, split by rows
(one all-reduce). The q/k norms are LayerNorms over all heads: sharded, their [sum, sum of squares] all-reduced
per token. The per-head `gate` keeps this rank's heads of `attn2`, nothing reduced. The feed-forward is SwiGLU:
`linear_1` / `linear_3` by columns, `linear_2` by rows. The modulation projection (`norm1.linear`) is split by
columns and its output all-gathered. Head counts per rank: `heads` (the processor derives the
head width and key/value heads from the projections' widths). Uneven heads: a rank may hold one head more, and
the feed-forward's width balances the bytes (`even_shard_plan`).
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.attention_processors import prepare_generic_attention
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


@register_cp_plan("LuminaNextDiT2DModel", prepare=prepare_generic_attention)
def lumina_next_cp_plan(model) -> dict:
    tokens = {"hidden_states": split_input(split_dim=1, expected_dims=3)}
    rope = {"image_rotary_emb": split_input(split_dim=1, expected_dims=3)}
    plan = first_and_every_block("layers", len(model.layers), tokens, rope)
    plan["norm_out"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


@register_tp_plan("LuminaNextDiT2DModel")
def lumina_next_tp_plan(model) -> TensorParallelPlan:
    block = {f"{attn}.{proj}": "colwise" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")}
    block.update({
        "attn2.to_out.0": "rowwise",  # projects self- plus cross-attention (attn1.to_out is an Identity)
        "feed_forward.linear_1": "colwise", "feed_forward.linear_3": "colwise", "feed_forward.linear_2": "rowwise",
        "norm1.linear": GATHER,  # the block's 4 modulation vectors: 13% of Lumina-Next-SFT's weights
    })
    norms = {f"{attn}.{norm}": None for attn in ("attn1", "attn2") for norm in ("norm_q", "norm_k")}  # qk_norm only
    return TensorParallelPlan(
        linears=present(model, block, "layers"),
        attention_attrs={"layers.*.attn1": ATTN_ATTRS, "layers.*.attn2": ATTN_ATTRS},
        sharded_norms=tuple(present(model, norms, "layers")),
        head_parameters={"layers.*": ("gate", "attn2")},  # scales attn2's per-head outputs
    )
