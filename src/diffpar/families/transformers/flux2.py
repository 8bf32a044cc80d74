"""FLUX.2 (`Flux2Transformer2DModel`): tensor-parallel plan (diffusers ships the context-parallel one)."""
from __future__ import annotations

from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    JOINT_ATTENTION,
    TensorParallelPlan,
    present,
    register_tp_plan,
)


def flux2_modulation(model) -> dict:
    return {name: GATHER for name in ("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                                      "single_stream_modulation.linear", "norm_out.linear")}


@register_tp_plan("Flux2Transformer2DModel")
def _flux2(model) -> TensorParallelPlan:
    double = {
        **JOINT_ATTENTION,
    }
    linears = present(model, double, "transformer_blocks")
    if len(model.transformer_blocks):
        ff = model.transformer_blocks[0].ff
        half = ff.linear_in.out_features // 2  # SwiGLU: gate and value halves, each split across ranks
        for stream in ("ff", "ff_context"):
            linears[f"transformer_blocks.*.{stream}.linear_in"] = Packed("colwise", (half, half))
            linears[f"transformer_blocks.*.{stream}.linear_out"] = "rowwise"
    attrs = {"transformer_blocks.*.attn": ATTN_ATTRS}
    if len(model.single_transformer_blocks):
        attn = model.single_transformer_blocks[0].attn
        inner, mlp = attn.inner_dim, attn.mlp_hidden_dim
        # q, k, v, then the MLP input, itself `mlp_mult_factor` parts (SwiGLU gate and value): each split alone.
        linears["single_transformer_blocks.*.attn.to_qkv_mlp_proj"] = Packed(
            "colwise", (inner, inner, inner) + (mlp,) * attn.mlp_mult_factor
        )
        linears["single_transformer_blocks.*.attn.to_out"] = Packed("rowwise", (inner, mlp))
        attrs["single_transformer_blocks.*.attn"] = ATTN_ATTRS + ("mlp_hidden_dim",)
    linears.update(flux2_modulation(model))
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
