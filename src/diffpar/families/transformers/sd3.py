"""Context- and tensor-parallel plans for Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`); diffusers ships
neither.

Plan: split the image tokens as they leave `pos_embed` (the positional embedding is added inside it, per token, on
the whole 2-D latent, so splitting its output is exact) and the text tokens as they leave `context_embedder`;
every block then works on its shard; gather after `proj_out`. Joint attention has no mask and no RoPE, so each
rank may hold [its image shard, its text shard] in any order: attention does not depend on the order of keys.

Forward change: SD3's `JointAttnProcessor2_0` calls `F.scaled_dot_product_attention` directly, so no parallel
config can reach it. While parallel, each attention gets `SD3ContextParallelAttnProcessor`: the same projections,
norms and output split, with attention through diffusers' dispatcher (which takes the parallel config). Detach
puts the original processor objects back.
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp import dispatch_attention
from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import joint_qkv, replace_attention_processors
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    DUAL_STREAM_FF,
    DUAL_STREAM_MODULATION,
    JOINT_ATTENTION,
    TensorParallelPlan,
    register_tp_plan,
)


class SD3ContextParallelAttnProcessor:
    """SD3's joint attention (image stream + optional text stream) through `dispatch_attention_fn`."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        image_tokens = hidden_states.shape[1]

        def heads(x):  # (B, S, H * D) -> (B, S, H, D): the dispatcher's layout
            return x.unflatten(-1, (attn.heads, -1))

        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, heads, text_first=False)

        # SD3's processor ignores attention_mask as well: the model never passes one.
        out = dispatch_attention(query, key, value, backend=self._attention_backend,
                                 parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)

        text_out = None
        if encoder_hidden_states is not None:
            out, text_out = out[:, :image_tokens], out[:, image_tokens:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, text_out)


def prepare_sd3(model, config, handle, name: str) -> None:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    replace_attention_processors(
        model, {JointAttnProcessor2_0: SD3ContextParallelAttnProcessor}, handle, name, type(model).__name__
    )


@register_cp_plan("SD3Transformer2DModel", prepare=prepare_sd3)
def sd3_cp_plan(model) -> dict:
    tokens = {0: split_input(split_dim=1, expected_dims=3, split_output=True)}
    return {
        "pos_embed": tokens,
        "context_embedder": tokens,
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


def per_block(model, container: str, styles: dict) -> dict:
    """Plan entries for every block of `container` whose module at each suffix exists (blocks of one stack may
    differ: SD3's last block has no text output projection or text MLP, only some blocks have a second
    attention), as plain paths."""
    entries = {}
    for index, block in enumerate(getattr(model, container, ())):
        for suffix, style in styles.items():
            obj = block
            for atom in suffix.split("."):
                obj = getattr(obj, atom, None) if not atom.isdigit() else (obj[int(atom)] if obj is not None else None)
                if obj is None:
                    break
            if obj is not None:
                entries[f"{container}.{index}.{suffix}"] = style
    return entries


@register_tp_plan("SD3Transformer2DModel")
def sd3_tp_plan(model) -> TensorParallelPlan:
    block = {
        **JOINT_ATTENTION,
        # SD3.5's dual attention: a second, image-only self-attention in the first blocks.
        "attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise", "attn2.to_out.0": "rowwise",
        **DUAL_STREAM_FF,
        # AdaLN modulation (6 or 9 vectors of the hidden width per stream and block).
        **DUAL_STREAM_MODULATION,
    }
    linears = per_block(model, "transformer_blocks", block)
    linears["norm_out.linear"] = GATHER
    # The per-head q/k RMSNorms (head_dim wide) need no change: each rank holds whole heads.
    attrs = {f"transformer_blocks.{i}.{name}": ATTN_ATTRS for i, b in enumerate(model.transformer_blocks)
             for name in ("attn", "attn2") if getattr(b, name, None) is not None}
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
