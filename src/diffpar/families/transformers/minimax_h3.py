"""MiniMax-H3 (`MiniMaxH3Transformer3DModel`): our context-parallel plan (diffusers' split, plus a local token
refiner; it replaces diffusers' own) and the tensor-parallel plan.

The model packs text, video and audio rows into one sequence with full self-attention. diffusers' plan splits the
packed sequence where it enters the first block, the RoPE table (one row per packed row) as it leaves `rope`, the
per-row AdaLN indices at every block and the output norm, and gathers both output heads; we keep that split. But
every attention processor gets the parallel config, the text token refiner's too, which runs on the whole prompt
before the split: its all-to-all (or ring) then attends over one copy of the prompt from every rank. The result is
the same (each key repeated equally often), the work and traffic are the degree times larger. Forward change, undone
on detach: the refiner's attentions compute locally (`ltx.local_attention_processors`).
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.ltx import local_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


def prepare_minimax_h3(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_minimax_h3 import MiniMaxH3AttnProcessor

    local_attention_processors(model, ("token_refiner.*",), (MiniMaxH3AttnProcessor,), handle, name)


@register_cp_plan("MiniMaxH3Transformer3DModel", prepare=prepare_minimax_h3, overrides_native=True)
def minimax_h3_cp_plan(model) -> dict:
    rows = split_input(split_dim=0, expected_dims=1)
    rope = split_input(split_dim=0, expected_dims=2, split_output=True)
    return {
        "rope": {0: rope, 1: rope},
        "transformer_blocks.0": {"hidden_states": split_input(split_dim=1, expected_dims=3)},
        # Every block reads forward's whole `adaln_indices`, so each splits its own copy.
        "transformer_blocks.*": {"adaln_indices": rows},
        "norm_out": {"timestep_indices": rows},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
        "audio_proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


def _block_plan(blocks) -> dict:
    """Attention heads split by q/k/v columns and output rows; the SwiGLU MLP's packed [value, gate] projection split
    half by half. q/k norms are per head (RMSNorm over head_dim), so they need no change."""
    ffn_dim = blocks[0].ff.net[2].in_features
    return {"attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "attn.to_out.0": "rowwise",
            "ff.net.0.proj": Packed("colwise", (ffn_dim, ffn_dim)), "ff.net.2": "rowwise"}


@register_tp_plan("MiniMaxH3Transformer3DModel")
def minimax_h3_tp_plan(model) -> TensorParallelPlan:
    linears, attrs = {}, {}
    for prefix, owner, stack in (("", model, "transformer_blocks"), ("token_refiner.", model.token_refiner,
                                                                    "refiner_blocks")):
        blocks = getattr(owner, stack)
        if len(blocks):
            linears.update({prefix + k: v for k, v in present(owner, _block_plan(blocks), stack).items()})
            attrs[f"{prefix}{stack}.*.attn"] = ATTN_ATTRS
    if len(model.transformer_blocks):
        linears.update(present(model, {"adaln_proj.linear": GATHER}, "transformer_blocks"))  # 18 modulation rows
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
