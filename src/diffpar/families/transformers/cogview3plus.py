"""CogView3-Plus (`CogView3PlusTransformer2DModel`): context- and tensor-parallel plans; diffusers ships neither.

CP plan: `patch_embed` returns [text, image] with the 2-D positional embedding added to the image part, and the
forward cuts it by the whole prompt length; so both streams are split entering the first block (exact: the
embedding was added per token before). Blocks work on [text shard, image shard] per rank: the joint attention has
no mask and no RoPE, so the order of keys is free, and the feed-forward is per token. Gather after `proj_out`.
Attention goes through diffusers' dispatcher (`ContextParallelCogVideoXAttnProcessor`).

TP plan: attention by heads, the MLP by width, each block's text/image AdaLN-Zero modulation (`norm1.linear`,
12 x dim) and the output modulation gathered.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import prepare_generic_attention
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


@register_cp_plan("CogView3PlusTransformer2DModel", prepare=prepare_generic_attention)
def cogview3plus_cp_plan(model) -> dict:
    tokens = split_input(split_dim=1, expected_dims=3)
    return {
        "transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("CogView3PlusTransformer2DModel")
def cogview_tp_plan(model) -> TensorParallelPlan:
    """CogView3-Plus' and CogView4's blocks (cogview4.py registers it too)."""
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
        "norm1.linear": GATHER,
    }
    linears = present(model, block, "transformer_blocks")
    linears["norm_out.linear"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs={"transformer_blocks.*.attn1": ATTN_ATTRS})
