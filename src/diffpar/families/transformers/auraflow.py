"""AuraFlow (`AuraFlowTransformer2DModel`): context- and tensor-parallel plans; diffusers ships neither.

CP plan: the image tokens are split as they leave `pos_embed` (its learned positional embedding is added inside,
per token, on the whole latent, so splitting its output is exact); the text tokens (8 learned register tokens
prepended to the projected prompt in the forward, not in a module) entering the first joint block. Joint
(MMDiT) blocks and single blocks then work on [text shard, image shard] per rank: their attention has no mask and
no RoPE, so the order of keys is free; the forward's final cut of the image tokens uses this rank's text length.
Gather after `proj_out`. Attention goes through diffusers' dispatcher (`ContextParallelAuraFlowAttnProcessor`).

TP plan: joint attention (both streams) and single attention by heads, every SwiGLU feed-forward by width, every
AdaLN-Zero modulation and the output modulation gathered.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import prepare_generic_attention
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    JOINT_ATTENTION,
    TensorParallelPlan,
    present,
    register_tp_plan,
)


def _swiglu(name: str) -> dict:
    return {f"{name}.linear_1": "colwise", f"{name}.linear_2": "colwise", f"{name}.out_projection": "rowwise"}


@register_cp_plan("AuraFlowTransformer2DModel", prepare=prepare_generic_attention)
def auraflow_cp_plan(model) -> dict:
    if len(model.joint_transformer_blocks) == 0:
        raise UnsupportedError(
            "AuraFlowTransformer2DModel with no joint (MMDiT) block: diffpar splits the prompt tokens entering the "
            "first joint block, and this model has none. Run it without ulysses_size / ring_size."
        )
    return {
        "pos_embed": {0: split_input(split_dim=1, expected_dims=3, split_output=True)},
        "joint_transformer_blocks.0": {"encoder_hidden_states": split_input(split_dim=1, expected_dims=3)},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("AuraFlowTransformer2DModel")
def auraflow_tp_plan(model) -> TensorParallelPlan:
    joint = {**JOINT_ATTENTION, **_swiglu("ff"), **_swiglu("ff_context"),
             "norm1.linear": GATHER, "norm1_context.linear": GATHER}
    single = {"attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "attn.to_out.0": "rowwise",
              **_swiglu("ff"), "norm1.linear": GATHER}
    linears = present(model, joint, "joint_transformer_blocks")
    linears.update(present(model, single, "single_transformer_blocks"))
    linears["norm_out.linear"] = GATHER
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"joint_transformer_blocks.*.attn": ATTN_ATTRS, "single_transformer_blocks.*.attn": ATTN_ATTRS},
    )
