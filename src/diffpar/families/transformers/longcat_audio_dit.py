"""LongCat AudioDiT (`LongCatAudioDiTTransformer`): context- and tensor-parallel plans; diffusers ships neither.

The sequence is 1-D: the latent frames only (24 kHz audio over a 2048x autoencoder, about 11.7 frames a second;
the pipeline caps a clip at 30 s: 351 frames). The model computes one RoPE table for the frames and one for the
prompt with the same module (`rotary_embed`), and passes the frames' padding mask (`attention_mask`, B x frames)
to every block, where it is both the self-attention's key mask and a multiplier of each attention's output rows.

CP plan: split the frames as they enter the first block, gather after the last block (the long skip, the final
AdaLN and `proj_out` then run on the whole sequence, as cheap as ever). The blocks receive the whole frame RoPE
table and the whole mask; while parallel, each attention gets a processor of ours (`prepare_longcat_audio_dit`,
undone on detach) that takes this rank's rows of both where they apply to its query shard (the rows diffusers'
split gave it, `tensor_split` order over the context-parallel group) and the whole mask as the key mask:
- self-attention: through diffusers' dispatcher with the parallel config (`attention_processors.attend_split`);
- cross-attention to the prompt (whole on every rank, with its padding mask): locally, no communication.

TP plan: both attentions by heads (their q/k RMSNorms span all heads: head-sharded), the GELU feed-forward by
width, the AdaLN expansions (`adaln_global_mlp.mlp.1`, or each block's `adaln_mlp.mlp.1`: 6 x dim; `norm_out.linear`)
gathered, the input MLPs (frames, prompt, latent condition, timestep) by width. The prompt's ConvNeXt refiner
(`text_conv_layer`, 4% of the weights): its GRN divides by a mean over all channels, so its pointwise Linears are
split by output and gathered (the prompt is short) and the GRN runs whole.
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp_group import shard_rows
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import blocks_split_plan
from diffpar.families.transformers.attention_processors import attend_split, replace_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan

_LABEL = "LongCatAudioDiTTransformer"


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    cos, sin = (t[None, :, None].to(x.device) for t in rope)
    first, second = x.chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-second, first), dim=-1).float() * sin).to(x.dtype)


def _heads(attn, query, key, value):
    batch_size = query.shape[0]
    if attn.qk_norm:
        query, key = attn.q_norm(query), attn.k_norm(key)
    head_dim = attn.inner_dim // attn.heads
    return tuple(t.view(batch_size, -1, attn.heads, head_dim) for t in (query, key, value))


class LongCatAudioContextParallelSelfAttnProcessor:
    """diffusers' `AudioDiTSelfAttnProcessor` over a frame shard: this rank's RoPE rows, the whole padding mask as
    the key mask, this rank's mask rows on the output."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, attention_mask=None, audio_rotary_emb=None):
        local = hidden_states.shape[1]
        query, key, value = _heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                   attn.to_v(hidden_states))
        if audio_rotary_emb is not None:
            rope = tuple(shard_rows(t, local, self._parallel_config, _LABEL) for t in audio_rotary_emb)
            query, key = _rotate(query, rope), _rotate(key, rope)
        key_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        out = attend_split(self, query, key, value, key_mask, f"{_LABEL} self-attention")
        if attention_mask is not None:
            rows = shard_rows(attention_mask, local, self._parallel_config, _LABEL, dim=1)
            out = out * rows[:, :, None, None].to(out.dtype)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class LongCatAudioLocalCrossAttnProcessor:
    """diffusers' `AudioDiTCrossAttnProcessor` from a frame shard to the whole prompt, computed on this rank (the
    parallel config only tells which RoPE and mask rows are this rank's)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, post_attention_mask=None, attention_mask=None,
                 audio_rotary_emb=None, prompt_rotary_emb=None):
        from diffusers.models.transformers.transformer_longcat_audio_dit import AudioDiTCrossAttnProcessor

        local = hidden_states.shape[1]
        if audio_rotary_emb is not None:
            audio_rotary_emb = tuple(shard_rows(t, local, self._parallel_config, _LABEL) for t in audio_rotary_emb)
        if post_attention_mask is not None:
            post_attention_mask = shard_rows(post_attention_mask, local, self._parallel_config, _LABEL, dim=1)
        whole = AudioDiTCrossAttnProcessor()  # its parallel config is None: local attention
        whole._attention_backend = self._attention_backend
        return whole(attn, hidden_states, encoder_hidden_states, post_attention_mask, attention_mask,
                     audio_rotary_emb, prompt_rotary_emb)


def prepare_longcat_audio_dit(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_longcat_audio_dit import (
        AudioDiTCrossAttnProcessor,
        AudioDiTSelfAttnProcessor,
    )

    replace_attention_processors(
        model, {AudioDiTSelfAttnProcessor: LongCatAudioContextParallelSelfAttnProcessor,
                AudioDiTCrossAttnProcessor: LongCatAudioLocalCrossAttnProcessor},
        handle, name, _LABEL, within=("blocks.",))


@register_cp_plan("LongCatAudioDiTTransformer", prepare=prepare_longcat_audio_dit)
def longcat_audio_dit_cp_plan(model) -> dict:
    return blocks_split_plan(model, "blocks", what="blocks")


@register_tp_plan("LongCatAudioDiTTransformer")
def longcat_audio_dit_tp_plan(model) -> TensorParallelPlan:
    attentions = ("self_attn", "cross_attn") if model.config.cross_attn else ("self_attn",)
    block = {"ffn.ff.0": "colwise", "ffn.ff.3": "rowwise"}
    for a in attentions:
        block.update({f"{a}.to_q": "colwise", f"{a}.to_k": "colwise", f"{a}.to_v": "colwise",
                      f"{a}.to_out.0": "rowwise"})
    if model.config.adaln_type == "local":
        block["adaln_mlp.mlp.1"] = GATHER
    linears = {f"blocks.*.{suffix}": style for suffix, style in block.items()}
    if model.config.adaln_type == "global":
        linears["adaln_global_mlp.mlp.1"] = GATHER
    linears["norm_out.linear"] = GATHER
    # The input MLPs (Linear, SiLU, Linear) outside the blocks: 4% of the weights, split like a feed-forward.
    embedders = ["input_embed.proj", "text_embed.proj", "time_embed.time_mlp"]
    if model.config.use_latent_condition:
        embedders += ["latent_embed.proj", "latent_cond_embedder.proj"]
    for mlp in embedders:
        linears[f"{mlp}.0"], linears[f"{mlp}.2"] = "colwise", "rowwise"
    if model.config.text_conv:
        # The prompt's ConvNeXt refiner: its GRN divides by a mean over all channels, so both pointwise Linears
        # gather their outputs (a few hundred prompt tokens, once per forward) and the GRN runs whole.
        linears["text_conv_layer.*.pwconv1"] = GATHER
        linears["text_conv_layer.*.pwconv2"] = GATHER
    norms = tuple(f"blocks.*.{a}.{n}" for a in attentions for n in ("q_norm", "k_norm")) if model.config.qk_norm \
        else ()
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={f"blocks.*.{a}": ("heads", "inner_dim") for a in attentions},
        sharded_norms=norms,
    )
