"""Lumina-Next (`LuminaNextDiT2DModel`): context-parallel plan; diffusers ships none. No tensor-parallel plan.

CP plan: the image tokens are split entering `layers.0` and the RoPE table (the pipeline's whole 2-D table, cut
to the image by `patch_embedder`) at every layer (`patch_embedder` returns it in a tuple with a list, which
diffusers' hooks cannot split); gather after `norm_out`. Each block's self-attention (`attn1`) goes through
diffusers' dispatcher (`ContextParallelLuminaAttnProcessor`: the patch mask is all ones and is dropped; the
"proportional attention" scale takes the whole length from that mask); its cross-attention (`attn2`) attends from
the image shard to the whole prompt, with the prompt mask, locally.

No TP plan: queries and keys are normalized by a LayerNorm across all heads, and each block scales its
cross-attention by a per-head gate parameter; diffpar's tensor-parallel engine shards neither (use
ulysses_size / ring_size).
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.attention_processors import prepare_generic_attention


@register_cp_plan("LuminaNextDiT2DModel", prepare=prepare_generic_attention)
def lumina_next_cp_plan(model) -> dict:
    tokens = {"hidden_states": split_input(split_dim=1, expected_dims=3)}
    rope = {"image_rotary_emb": split_input(split_dim=1, expected_dims=3)}
    plan = first_and_every_block("layers", len(model.layers), tokens, rope)
    plan["norm_out"] = gather_output(gather_dim=1, expected_dims=3)
    return plan
