"""FLUX.1 (`FluxTransformer2DModel`): tensor-parallel plan (diffusers ships the context-parallel one)."""
from __future__ import annotations

from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    DUAL_STREAM_FF,
    JOINT_ATTENTION,
    TensorParallelPlan,
    present,
    register_tp_plan,
)


@register_tp_plan("FluxTransformer2DModel", "FluxControlNetModel")  # the ControlNet: the same blocks
def _flux(model) -> TensorParallelPlan:
    double = {**JOINT_ATTENTION, **DUAL_STREAM_FF}
    linears = present(model, double, "transformer_blocks")
    if len(model.single_transformer_blocks):
        block = model.single_transformer_blocks[0]
        single = {
            "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "proj_mlp": "colwise",
            # proj_out reads cat([attention output, MLP hidden]): two column-sharded streams.
            "proj_out": Packed("rowwise", (model.inner_dim, block.mlp_hidden_dim)),
        }
        linears.update(present(model, single, "single_transformer_blocks"))
    linears.update(flux_modulation(model))
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"transformer_blocks.*.attn": ATTN_ATTRS, "single_transformer_blocks.*.attn": ATTN_ATTRS},
    )


def flux_modulation(model) -> dict:
    gathered = present(model, {"norm1.linear": GATHER, "norm1_context.linear": GATHER}, "transformer_blocks")
    gathered.update(present(model, {"norm.linear": GATHER}, "single_transformer_blocks"))
    if hasattr(model, "norm_out"):  # a Flux ControlNet has the blocks but no output layer
        gathered["norm_out.linear"] = GATHER
    return gathered
