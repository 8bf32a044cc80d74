"""CogView4 (`CogView4Transformer2DModel`): context- and tensor-parallel plans; diffusers ships none.

CP plan: `patch_embed` returns (image tokens, text tokens), both split there; the RoPE pair (cos, sin) over the
image tokens (made by `rope`, or given by the caller) is split at every block, where it arrives. Blocks work on
[text shard, image shard] per rank: attention has no mask in the pipeline's calls, RoPE travels with the image
tokens, and the feed-forward is per token. Gather after `proj_out`. Attention goes through diffusers' dispatcher
(`ContextParallelCogView4AttnProcessor`; a real text mask is refused under context parallelism).

TP plan: attention by heads, the MLP by width, each block's text/image AdaLN-Zero modulation (12 x dim) and the
output modulation gathered.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import prepare_generic_attention
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


@register_cp_plan("CogView4Transformer2DModel", prepare=prepare_generic_attention)
def cogview4_cp_plan(model) -> dict:
    streams = split_input(split_dim=1, expected_dims=3, split_output=True)
    rope_half = split_input(split_dim=0, expected_dims=2)
    return {
        "patch_embed": {0: streams, 1: streams},
        "transformer_blocks.*": {"image_rotary_emb": [rope_half, rope_half]},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("CogView4Transformer2DModel")
def cogview4_tp_plan(model) -> TensorParallelPlan:
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
        "norm1.linear": GATHER,
    }
    linears = present(model, block, "transformer_blocks")
    linears["norm_out.linear"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs={"transformer_blocks.*.attn1": ATTN_ATTRS})
