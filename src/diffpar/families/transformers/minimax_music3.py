"""MiniMax Music 3 (`MiniMaxMusic3Transformer1DModel`): context- and tensor-parallel plans; diffusers ships neither.

The sequence is 1-D: one timestep token prepended inside the forward, then the Flow-VAE latent frames (the
frame-aligned conditioning is concatenated on channels before `proj_in`, so it is per token, not a prompt). Only
self-attention, already through diffusers' dispatcher with the parallel config; partial RoPE from `rotary_emb`,
computed inside the forward for the whole sequence.

CP plan: split the (cos, sin) pair as it leaves `rotary_emb` and the tokens as they enter the first block (the
timestep token already prepended, so both cut the same rows); gather after the last block (the forward then drops
the timestep token, which a shard cannot do).

TP plan: attention by heads, the SwiGLU feed-forward's value and gate halves each split (`ff_in`), `ff_out` by
rows. The timestep MLP, `proj_in` / `proj_out` stay whole.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import split_input
from diffpar.engines.tp_shard import Packed
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import blocks_split_plan
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan


@register_cp_plan("MiniMaxMusic3Transformer1DModel")
def minimax_music3_cp_plan(model) -> dict:
    rows = split_input(split_dim=0, expected_dims=2, split_output=True)
    return blocks_split_plan(model, tables={"rotary_emb": {0: rows, 1: rows}})


@register_tp_plan("MiniMaxMusic3Transformer1DModel")
def minimax_music3_tp_plan(model) -> TensorParallelPlan:
    inner = model.config.ff_inner_dim
    block = {
        "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "attn.to_out.0": "rowwise",
        "ff_in": Packed("colwise", (inner, inner)), "ff_out": "rowwise",
    }
    return TensorParallelPlan(
        linears={f"transformer_blocks.*.{suffix}": style for suffix, style in block.items()},
        attention_attrs={"transformer_blocks.*.attn": ("heads", "inner_dim")},
    )
