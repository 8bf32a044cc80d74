"""Wan 2.x (`WanTransformer3DModel`): tensor-parallel plan (diffusers ships the context-parallel one)."""
from __future__ import annotations

from diffpar.engines.tp_shard import GATHER
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    TensorParallelPlan,
    present,
    register_tp_plan,
)


@register_tp_plan("WanTransformer3DModel")
def _wan(model) -> TensorParallelPlan:
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise", "attn2.to_out.0": "rowwise",
        "attn2.add_k_proj": "colwise", "attn2.add_v_proj": "colwise",  # I2V image context only
        "ffn.net.0.proj": "colwise", "ffn.net.2": "rowwise",
    }
    norms = ["attn1.norm_q", "attn1.norm_k", "attn2.norm_q", "attn2.norm_k", "attn2.norm_added_k"]
    present_norms = tuple(present(model, {n: None for n in norms}, "blocks"))
    linears = present(model, block, "blocks")
    linears["condition_embedder.time_proj"] = GATHER  # the 6 modulation vectors of every block
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"blocks.*.attn1": ATTN_ATTRS, "blocks.*.attn2": ATTN_ATTRS},
        sharded_norms=present_norms,
    )
