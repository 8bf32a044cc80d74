"""Qwen-Image (`QwenImageTransformer2DModel`): tensor-parallel plan (diffusers ships the context-parallel one)."""
from __future__ import annotations

from diffpar.engines.tp_shard import GATHER
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    JOINT_ATTENTION,
    TensorParallelPlan,
    present,
    register_tp_plan,
)


def qwenimage_modulation(model) -> dict:
    gathered = present(model, {"img_mod.1": GATHER, "txt_mod.1": GATHER}, "transformer_blocks")
    if hasattr(model, "norm_out"):  # a Qwen-Image ControlNet has the blocks but no output layer
        gathered["norm_out.linear"] = GATHER
    return gathered


@register_tp_plan("QwenImageTransformer2DModel", "QwenImageControlNetModel")  # the ControlNet: the same blocks
def _qwenimage(model) -> TensorParallelPlan:
    double = {
        **JOINT_ATTENTION,
        "img_mlp.net.0.proj": "colwise", "img_mlp.net.2": "rowwise",
        "txt_mlp.net.0.proj": "colwise", "txt_mlp.net.2": "rowwise",
    }
    return TensorParallelPlan(
        linears={**present(model, double, "transformer_blocks"), **qwenimage_modulation(model)},
        attention_attrs={"transformer_blocks.*.attn": ATTN_ATTRS},
    )
