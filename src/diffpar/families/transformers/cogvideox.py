"""CogVideoX (`CogVideoXTransformer3DModel`): context- and tensor-parallel plans; diffusers ships neither.

The forward embeds [text, video] together in `patch_embed` (the sin-cos positional embedding of the 2B model is
added there, on the whole sequence), then slices the text and video parts apart before the blocks. The plan splits
both parts where they enter the first block, so each rank holds [its text shard, its video shard]; the RoPE table
(cos, sin), a forward argument the pipeline computes for the whole video, is split with the video tokens as it
enters the model. Blocks work on shards (their feed-forward is per token); gather after `proj_out`.

Forward change, undone on detach: `CogVideoXAttnProcessor2_0` calls `F.scaled_dot_product_attention` directly,
so each block's attention gets the shared `ContextParallelCogVideoXAttnProcessor` (attention_processors.py): the
same projections, norms and RoPE on the video part, with attention through diffusers' dispatcher (which takes the
parallel config). Joint attention has no mask here, so the order of keys across ranks does not matter. ConsisID
(consisid.py) has the same blocks.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import (
    ContextParallelCogVideoXAttnProcessor,
    replace_attention_processors,
)
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


def prepare_cogvideox(model, config, handle, name: str) -> None:
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    replace_attention_processors(model, {CogVideoXAttnProcessor2_0: ContextParallelCogVideoXAttnProcessor}, handle,
                                 name, type(model).__name__, within=("transformer_blocks",))


def rope_entry() -> list:
    """The (cos, sin) RoPE table, each (video tokens, head_dim): split along the tokens."""
    return [split_input(split_dim=0, expected_dims=2), split_input(split_dim=0, expected_dims=2)]


def first_block_entry() -> dict:
    tokens = split_input(split_dim=1, expected_dims=3)
    return {"hidden_states": tokens, "encoder_hidden_states": tokens}


@register_cp_plan("CogVideoXTransformer3DModel", prepare=prepare_cogvideox)
def cogvideox_cp_plan(model) -> dict:
    if not len(model.transformer_blocks):
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    return {
        "": {"image_rotary_emb": rope_entry()},
        "transformer_blocks.0": first_block_entry(),
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


def cogvideox_block_tp(model) -> tuple[dict, dict]:
    """Linears and attention attributes of CogVideoX-style blocks (also ConsisID's)."""
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
        # AdaLN-zero: six modulation vectors for the video and text streams.
        "norm1.linear": GATHER, "norm2.linear": GATHER,
    }
    linears = present(model, block, "transformer_blocks")
    linears["norm_out.linear"] = GATHER
    # qk-norm is a LayerNorm over each head's dim: per head, so it needs no all-reduce.
    return linears, {"transformer_blocks.*.attn1": ATTN_ATTRS}


@register_tp_plan("CogVideoXTransformer3DModel")
def _cogvideox_tp(model) -> TensorParallelPlan:
    linears, attrs = cogvideox_block_tp(model)
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
