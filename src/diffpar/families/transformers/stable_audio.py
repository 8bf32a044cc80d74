"""Stable Audio Open (`StableAudioDiTModel`): context- and tensor-parallel plans; diffusers ships neither.

The sequence is 1-D: one global token (timestep + global conditioning, prepended inside the forward) followed by
the audio latent frames (Stable Audio Open 1.0 at 47 s: 1024 frames, 1025 tokens). The rotary table is a model
input (`rotary_embedding`, a (cos, sin) pair of (tokens, rot_dim) tables the pipeline builds for global + frames)
and every block receives it whole.

CP plan: split the tokens as they enter the first block (after the global token is prepended); gather after
`proj_out` (the forward then drops the global token and runs a 1x1 convolution, which needs every frame). Each
block's self-attention (`attn1`) goes through diffusers' dispatcher (`StableAudioContextParallelAttnProcessor`,
swapped in while parallel), with this rank's rows of the whole rotary pair every block receives
(`compat.diffusers_cp_group.shard_rows`: the rows diffusers' split gave the tokens); cross-attention (`attn2`, to the whole prompt every rank holds, grouped-query) keeps
diffusers' own processor and runs locally. A self-attention mask (`attention_mask`, never passed by the pipeline)
goes to the dispatcher over the whole sequence (see `attention_processors.attend_split`).

TP plan: both attentions by heads (query heads and key/value heads divided alike), the SwiGLU feed-forward by
width (its fused gate/value projection split half by half). Timestep, global and prompt projections stay whole.
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp_group import shard_rows
from diffpar.engines.tp_shard import Packed
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import blocks_split_plan
from diffpar.families.transformers.attention_processors import attend_split, replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, register_tp_plan


def _rotate_partial(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Stable Audio's RoPE on the first rot_dim channels of (B, H, S, D), the rest unrotated."""
    from diffusers.models.embeddings import apply_rotary_emb

    rot_dim = rotary[0].shape[-1]
    rotated = apply_rotary_emb(x[..., :rot_dim], rotary, use_real=True, use_real_unbind_dim=-2)
    return torch.cat((rotated, x[..., rot_dim:]), dim=-1)


class StableAudioContextParallelAttnProcessor:
    """diffusers' `StableAudioAttnProcessor2_0` for self-attention over a token shard (this rank's rows of the
    rotary table arrive with it), through the dispatcher with the parallel config."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None:  # not swapped onto cross-attention; kept exact if ever called so
            from diffusers.models.attention_processor import StableAudioAttnProcessor2_0

            return StableAudioAttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask,
                                                 rotary_emb)
        batch_size = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, kv_heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, kv_heads, head_dim).transpose(1, 2)
        if kv_heads != attn.heads:
            repeat = attn.heads // kv_heads
            key = torch.repeat_interleave(key, repeat, dim=1)
            value = torch.repeat_interleave(value, repeat, dim=1)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rotary_emb is not None:
            rotary_emb = tuple(shard_rows(t, query.shape[2], self._parallel_config, "StableAudioDiTModel")
                               for t in rotary_emb)
            dtype = query.dtype
            query = _rotate_partial(query.float(), rotary_emb).to(dtype)
            key = _rotate_partial(key.float(), rotary_emb).to(dtype)
        mask = None
        if attention_mask is not None:  # (B, tokens) key padding over the whole sequence
            mask = attention_mask.bool()[:, None, None, :]
        out = attend_split(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask,
                           "StableAudioDiTModel self-attention")
        out = out.reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def prepare_stable_audio(model, config, handle, name: str) -> None:
    from diffusers.models.attention_processor import StableAudioAttnProcessor2_0

    self_attention = tuple(f"transformer_blocks.{i}.attn1" for i in range(len(model.transformer_blocks)))
    replace_attention_processors(model, {StableAudioAttnProcessor2_0: StableAudioContextParallelAttnProcessor},
                                 handle, name, type(model).__name__, within=self_attention)


@register_cp_plan("StableAudioDiTModel", prepare=prepare_stable_audio)
def stable_audio_cp_plan(model) -> dict:
    return blocks_split_plan(model, gather_after="proj_out")


@register_tp_plan("StableAudioDiTModel")
def stable_audio_tp_plan(model) -> TensorParallelPlan:
    ff_inner = model.transformer_blocks[0].ff.net[2].in_features if len(model.transformer_blocks) else 0
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise", "attn2.to_out.0": "rowwise",
        # SwiGLU: one Linear computes value and gate halves; each half is split across ranks.
        "ff.net.0.proj": Packed("colwise", (ff_inner, ff_inner)), "ff.net.2": "rowwise",
    }
    return TensorParallelPlan(
        linears={f"transformer_blocks.*.{suffix}": style for suffix, style in block.items()},
        attention_attrs={"transformer_blocks.*.attn1": ATTN_ATTRS, "transformer_blocks.*.attn2": ATTN_ATTRS},
    )
