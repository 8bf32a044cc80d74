"""DiT (`DiTTransformer2DModel`, class-conditional): context- and tensor-parallel plans; diffusers ships neither.

CP plan: the image tokens are split as they leave `pos_embed` (the 2-D sin-cos positional embedding is added
inside it, so splitting its output is exact); blocks work on shards (self-attention only, through diffusers'
dispatcher with `ContextParallelAttnProcessor2_0`); gather after `proj_out_2`, before the unpatchify (which reads
the image side from the whole token count).

TP plan: attention by heads, MLP by width; every block's AdaLN-Zero modulation (`norm1.linear`, 6 x dim) and its
own timestep embedding's second linear and class-label table (split along its width) gathered; the output
modulation (`proj_out_1`) gathered. The first timestep linears stay whole.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import check_generic_attention, prepare_generic_attention
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan

_BLOCK = {
    "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
    "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
    "norm1.linear": GATHER, "norm1.emb.timestep_embedder.linear_2": GATHER,
    "norm1.emb.class_embedder.embedding_table": GATHER,  # (classes + 1) x dim per block, rows gathered
}


@register_cp_plan("DiTTransformer2DModel", prepare=prepare_generic_attention)
def dit_cp_plan(model) -> dict:
    check_generic_attention(model, type(model).__name__)
    return {
        "pos_embed": {0: split_input(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out_2": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("DiTTransformer2DModel")
def dit_tp_plan(model) -> TensorParallelPlan:
    linears = present(model, _BLOCK, "transformer_blocks")
    linears["proj_out_1"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs={"transformer_blocks.*.attn1": ATTN_ATTRS})
