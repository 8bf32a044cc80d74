"""Stable Audio 3 (`StableAudio3DiTModel`): context- and tensor-parallel plans; diffusers ships neither.

The sequence is 1-D: `num_memory_tokens` learned tokens (64) prepended inside the forward, then the audio latent
frames (44.1 kHz audio over a 4096x autoencoder: about 10.8 frames a second, so 47 s is 507 frames, 571 tokens).
The RoPE table (tokens x rot_dim) is computed inside the forward by `rotary_pos_emb` for the whole sequence.

CP plan: split the RoPE table as it leaves `rotary_pos_emb` and the tokens as they enter the first block (memory
tokens already prepended, so both splits cut the same rows); gather the tokens after the last block (the forward
then drops the memory tokens, which a shard cannot do). Self-attention already goes through diffusers' dispatcher
with the parallel config. Cross-attention to the context (prompt + duration token, whole on every rank) runs
locally: its processor gets a class that never passes the parallel config on (`ltx.local_attention_processors`).
Inpainting's `local_add_cond` (one row per audio frame, added after the memory tokens inside each block): a
pre-hook on every block (undone on detach) gives it the rows of this rank's audio frames and the count of memory
tokens this shard holds.

TP plan: the fused self-attention projection [q1 | q2 | k1 | k2 | v] and the cross-attention's [q1 | q2] and
[k1 | k2 | v] split part by part (whole heads on each rank), outputs by rows; the SwiGLU feed-forward's gate and
value halves each split; the inpainting projection `to_local_embed` by width; the shared AdaLN expansion
(`global_cond_embedder.2`, 6 x dim) gathered. The per-head q/k RMSNorms need no change.
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp_group import token_shards
from diffpar.compat.diffusers_cp_hooks import split_input
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import blocks_split_plan
from diffpar.families.transformers.ltx import local_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan


def _shard_of(whole: int, parallel_config) -> tuple[int, int]:
    """(first row, rows) of this rank's token shard of a `whole`-token sequence, as diffusers' split hooks deal it
    (`tensor_split` sizes in the order of the context-parallel group's ranks)."""
    shards = token_shards(parallel_config)
    sizes = [len(part) for part in torch.arange(whole).tensor_split(shards.size)]
    return sum(sizes[:shards.rank]), sizes[shards.rank]


def _inpaint_rows(model):
    """Pre-hook of every block: inpainting's `local_seq` (one row per audio frame, added after the memory tokens)
    cut to the audio frames of this rank's shard, and `num_memory_tokens` to the memory tokens it holds. Computed
    from the whole length, so it holds before block 0's split hook too."""

    def hook(module, args, kwargs):
        local_seq = kwargs.get("local_seq")
        if local_seq is None:
            return None
        parallel_config = model.transformer_blocks[0].self_attn.processor._parallel_config
        if parallel_config is None:
            return None
        memory = kwargs.get("num_memory_tokens", 0)
        first, rows = _shard_of(memory + local_seq.shape[1], parallel_config)
        held_memory = max(0, min(first + rows, memory) - first)
        audio_from = max(first, memory) - memory
        audio_rows = rows - held_memory
        return args, {**kwargs, "local_seq": local_seq[:, audio_from:audio_from + audio_rows],
                      "num_memory_tokens": held_memory}

    return hook


def prepare_stable_audio3(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_stable_audio3 import StableAudio3CrossAttnProcessor

    local_attention_processors(model, ("transformer_blocks.*.cross_attn",), (StableAudio3CrossAttnProcessor,),
                               handle, name)
    hooks = []
    handle.add(f"{name}: inpainting rows per shard", lambda: [h.remove() for h in hooks])
    for block in model.transformer_blocks:
        hooks.append(block.register_forward_pre_hook(_inpaint_rows(model), with_kwargs=True))


@register_cp_plan("StableAudio3DiTModel", prepare=prepare_stable_audio3)
def stable_audio3_cp_plan(model) -> dict:
    return blocks_split_plan(
        model, tables={"rotary_pos_emb": {0: split_input(split_dim=0, expected_dims=2, split_output=True)}})


@register_tp_plan("StableAudio3DiTModel")
def stable_audio3_tp_plan(model) -> TensorParallelPlan:
    dim = model.config.embed_dim
    differential = model.config.use_differential_attention
    inner = model.transformer_blocks[0].ff.proj_out.in_features if len(model.transformer_blocks) else 0
    block = {
        "self_attn.to_qkv": Packed("colwise", (dim,) * (5 if differential else 3)),
        "self_attn.to_out": "rowwise",
        "cross_attn.to_q": Packed("colwise", (dim,) * (2 if differential else 1)),
        "cross_attn.to_kv": Packed("colwise", (dim,) * (3 if differential else 2)),
        "cross_attn.to_out": "rowwise",
        "ff.proj_in": Packed("colwise", (inner, inner)), "ff.proj_out": "rowwise",
        "to_local_embed.0": "colwise", "to_local_embed.2": "rowwise",
    }
    linears = {f"transformer_blocks.*.{suffix}": style for suffix, style in block.items()}
    linears["global_cond_embedder.2"] = GATHER
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"transformer_blocks.*.self_attn": ("heads",), "transformer_blocks.*.cross_attn": ("heads",)},
    )
