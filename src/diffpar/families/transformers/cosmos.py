"""Cosmos (`CosmosTransformer3DModel`, Predict 1/2 and 2.5): context- and tensor-parallel plans; diffusers ships
neither.

Blocks: self-attention over the video tokens (RoPE), cross-attention to the prompt (and, in 2.5, to image-context
tokens), feed-forward, each with AdaLN modulation. The plan splits the video tokens where they enter the first
block; the RoPE table as it leaves `rope` and the learnable positional embedding as it leaves
`learnable_pos_embed` (both computed for the whole video); and, at every block and at `norm_out`, the per-token
inputs some variants pass: the timestep embeddings when the timestep is given per frame (B, 1, T, 1, 1: they become
one row per token) and ControlNet residuals (Transfer). Each is split only when it has a token dimension (3-D).
Gather after `proj_out`.

Forward change, undone on detach: `CosmosAttnProcessor2_0` calls the dispatcher without a parallel config, so the
self-attention (`attn1`) gets `CosmosContextParallelAttnProcessor`, the same computation with the config. The
cross-attention keeps its processor: queries from the video shard, keys from the whole prompt (and its mask), which
is local and exact.
"""
from __future__ import annotations

import inspect

import torch

from diffpar.compat.diffusers_cp import dispatch_attention
from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


class CosmosContextParallelAttnProcessor:
    """Cosmos' self-attention through the dispatcher with the parallel config."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is not None or attention_mask is not None:
            raise UnsupportedError("Cosmos: the context-parallel processor is for self-attention only.")

        def heads(x):  # (B, S, H * D) -> (B, H, S, D): the layout of the original norms and RoPE
            return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=True, use_real_unbind_dim=-2)
        groups = query.shape[1] // key.shape[1]  # grouped-query attention, as the original repeats
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        out = dispatch_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                 backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def prepare_cosmos(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0

    self_attention = tuple(f"transformer_blocks.{i}.attn1" for i in range(len(model.transformer_blocks)))
    replace_attention_processors(model, {CosmosAttnProcessor2_0: CosmosContextParallelAttnProcessor}, handle, name,
                                 type(model).__name__, within=self_attention)


@register_cp_plan("CosmosTransformer3DModel", prepare=prepare_cosmos)
def cosmos_cp_plan(model) -> dict:
    if not len(model.transformer_blocks):
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    per_token = split_input(split_dim=1, expected_dims=3)  # left whole when it has no token dimension (2-D)
    rope = split_input(split_dim=0, expected_dims=2, split_output=True)
    # ControlNet residuals reach the blocks from 0.37 (Transfer 2.5); earlier blocks take no such argument.
    block_args = inspect.signature(type(model.transformer_blocks[0]).forward).parameters
    residual = {"controlnet_residual": per_token} if "controlnet_residual" in block_args else {}
    plan = {
        "rope": {0: rope, 1: rope},
        "transformer_blocks.0": {"hidden_states": per_token},
        "transformer_blocks.*": {"temb": per_token, "embedded_timestep": per_token, **residual},
        "norm_out": {"temb": per_token, "embedded_timestep": per_token},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }
    if model.learnable_pos_embed is not None:
        plan["learnable_pos_embed"] = {0: split_input(split_dim=1, expected_dims=3, split_output=True)}
    return plan


@register_tp_plan("CosmosTransformer3DModel")
def _cosmos_tp(model) -> TensorParallelPlan:
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise", "attn2.to_out.0": "rowwise",
        "attn2.q_img": "colwise", "attn2.k_img": "colwise", "attn2.v_img": "colwise",  # 2.5 image context
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
        # AdaLN-LoRA modulation (down to the LoRA rank, up to 3 x width): both gathered.
        "norm1.linear_1": GATHER, "norm1.linear_2": GATHER, "norm2.linear_1": GATHER, "norm2.linear_2": GATHER,
        "norm3.linear_1": GATHER, "norm3.linear_2": GATHER,
    }
    linears = present(model, block, "transformer_blocks")
    linears.update({name: GATHER for name in ("time_embed.t_embedder.linear_1", "time_embed.t_embedder.linear_2",
                                              "norm_out.linear_1", "norm_out.linear_2")})
    # The 2.5 image-context branch computes its head width as out_dim / heads: divided with the heads.
    attn2 = (*ATTN_ATTRS, "out_dim") if "transformer_blocks.*.attn2.q_img" in linears else ATTN_ATTRS
    # q/k norms are RMSNorms over each head's dim: per head, no all-reduce.
    return TensorParallelPlan(linears=linears, attention_attrs={
        "transformer_blocks.*.attn1": ATTN_ATTRS, "transformer_blocks.*.attn2": attn2,
    })
