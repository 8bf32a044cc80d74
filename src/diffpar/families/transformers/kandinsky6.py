"""Kandinsky 6 (`Kandinsky6Transformer3DModel`, video + audio) and its super-resolution transformer
(`Kandinsky6SRTransformer3DModel`): context- and tensor-parallel plans; diffusers ships neither.

Kandinsky 6: the prompt runs through two text branches (video, audio: text self-attention), then each fused block
runs, for the video tokens, self-attention (3-D RoPE) and cross-attention to the video prompt, for the audio tokens
(when given) the same against the audio prompt, then the two cross-modal attentions: video queries over audio keys
(`va_cross_attention`) and audio queries over video keys (`av_cross_attention`). The forward flattens the video
tokens and their RoPE table with functions, so the plan splits the video tokens where they enter the first fused
block and the RoPE table (N, 1, D/2, 2, 2) at every fused block, and gathers the last block's video output (a
forward hook: the block returns (video, audio), and audio may be None, which diffusers' gather hook refuses).

The audio stream (short) and both prompts stay whole on every rank, as in LTX-2 (ltx.py). Per fused block:
- video self-attention: context-parallel attention;
- both prompt cross-attentions, the audio self-attention and `va_cross_attention` (video-shard queries, whole
  audio keys): local, no communication (processor class with no parallel config, undone on detach);
- `av_cross_attention` (whole audio queries, video keys): the video keys' input and their RoPE rows are gathered
  from every rank first (one all-gather of a (B, video tokens, dim) tensor), then local.
The text branches run whole on every rank, locally.

Kandinsky 6 SR: every self-attention is NABLA sparse attention, whose block mask is built from the block means of
the queries and keys of the whole video (then a top-mass selection over all key blocks): a sequence split changes
the mask. Context parallelism is refused; tensor parallelism splits heads, and the mask is per head, so it is exact.
"""
from __future__ import annotations

import copy

from diffpar.compat.diffusers_cp_hooks import split_input, unshard
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.consisid import gather_block_outputs
from diffpar.families.transformers.ltx import local_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, present, register_tp_plan

# Attentions whose keys every rank holds whole (prompt, audio): computed locally.
_K6_LOCAL = (
    "video_text_transformer_blocks.*.attn", "audio_text_transformer_blocks.*.attn",
    "visual_transformer_blocks.*.video_dec_block.cross_attention",
    "visual_transformer_blocks.*.audio_dec_block.self_attention",
    "visual_transformer_blocks.*.audio_dec_block.cross_attention",
    "visual_transformer_blocks.*.va_cross_attention",
)
_K6_GATHER_KEYS = "av_cross_attention"

_GATHER_KEYS_CLASSES: dict[type, type] = {}


def _gather_keys_class(base: type) -> type:
    """`base` for the audio-to-video attention: the video keys' input (and their RoPE rows, token dim 0) of every
    rank, then attention computed locally."""
    if base in _GATHER_KEYS_CLASSES:
        return _GATHER_KEYS_CLASSES[base]

    def _get(self):
        return None

    def _set(self, value):
        self.__dict__["_gather_config"] = value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, rotary_emb_kv=None,
                 attn_mask=None):
        config = self.__dict__.get("_gather_config")
        if config is not None and encoder_hidden_states is not None:
            cp = config.context_parallel_config
            encoder_hidden_states = unshard(encoder_hidden_states.contiguous(), 1, cp)
            if rotary_emb_kv is not None:  # the video RoPE rows (ca_rope=True), split like the tokens
                rotary_emb_kv = unshard(rotary_emb_kv.contiguous(), 0, cp)
        return base.__call__(self, attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             rotary_emb=rotary_emb, rotary_emb_kv=rotary_emb_kv, attn_mask=attn_mask)

    cls = type(f"GatherKeys{base.__name__}", (base,), {
        "__doc__": f"{base.__name__} with the video keys gathered from every rank, attention computed locally.",
        "_parallel_config": property(_get, _set),
        "__call__": __call__,
    })
    _GATHER_KEYS_CLASSES[base] = cls
    return cls


def prepare_kandinsky6(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_kandinsky6 import Kandinsky6AttnProcessor

    label = type(model).__name__
    local_attention_processors(model, _K6_LOCAL, (Kandinsky6AttnProcessor,), handle, name)
    targets = []
    handle.add(f"{name}: audio-to-video attention processors",
               lambda: [setattr(m, "processor", p) for m, p in targets])
    for i, block in enumerate(model.visual_transformer_blocks):
        attention = getattr(block, _K6_GATHER_KEYS)
        if type(attention.processor) is not Kandinsky6AttnProcessor:
            raise UnsupportedError(
                f"{label}: visual_transformer_blocks.{i}.{_K6_GATHER_KEYS} has a "
                f"{type(attention.processor).__name__}, which has no context-parallel version in diffpar. Remove "
                "what installed it before enable_cache.")
        targets.append((attention, attention.processor))
    for attention, old in targets:
        new = copy.copy(old)
        new.__class__ = _gather_keys_class(type(old))
        attention.processor = new
    gather_block_outputs(model, model.visual_transformer_blocks[-1], (0,), handle, name,
                         "gather the last fused block's video tokens")


@register_cp_plan("Kandinsky6Transformer3DModel", prepare=prepare_kandinsky6,
                  hook_gathers=("visual_transformer_blocks[-1] (video tokens)",
                                f"visual_transformer_blocks.*.{_K6_GATHER_KEYS} (video keys, for the audio queries)"))
def kandinsky6_cp_plan(model) -> dict:
    blocks = len(model.visual_transformer_blocks)
    if not blocks:
        raise UnsupportedError(f"{type(model).__name__} has no fused blocks to parallelize.")
    # Fused block forward(vis, aud, text_v, text_a, time_embed, vis_rope, aud_rope, attn_mask).
    rope = {"vis_rope": split_input(split_dim=0, expected_dims=5)}
    tokens = {"vis": split_input(split_dim=1, expected_dims=3)}
    # One hook per block and argument: the table is split at every block, the tokens at the first only.
    if blocks == 1:
        return {"visual_transformer_blocks.0": {**tokens, **rope}}
    return {"visual_transformer_blocks.0": tokens, "visual_transformer_blocks.*": rope}


def _k6_attention(prefix: str) -> dict:
    return {f"{prefix}.to_query": "colwise", f"{prefix}.to_key": "colwise", f"{prefix}.to_value": "colwise",
            f"{prefix}.out_layer": "rowwise"}


_K6_FEED_FORWARD = {"feed_forward.net.0.proj": "colwise", "feed_forward.net.2": "rowwise"}


@register_tp_plan("Kandinsky6Transformer3DModel")
def _kandinsky6_tp(model) -> TensorParallelPlan:
    # Every attention and feed-forward is split by heads / hidden columns; the AdaLN modulations are gathered.
    # q/k norms are RMSNorms over each head's dim: per head, no all-reduce. RoPE tables broadcast over heads.
    text = {**_k6_attention("attn"), **_K6_FEED_FORWARD, "text_modulation.out_layer": GATHER}
    fused = {"va_modulation.out_layer": GATHER, "av_modulation.out_layer": GATHER,
             **_k6_attention("va_cross_attention"), **_k6_attention("av_cross_attention")}
    for stream in ("video_dec_block", "audio_dec_block"):
        fused.update({f"{stream}.{k}": v for k, v in {
            **_k6_attention("self_attention"), **_k6_attention("cross_attention"), **_K6_FEED_FORWARD,
            "visual_modulation.out_layer": GATHER}.items()})
    linears = {}
    for branch in ("video_text_transformer_blocks", "audio_text_transformer_blocks"):
        linears.update(present(model, text, branch))
    linears.update(present(model, fused, "visual_transformer_blocks"))
    linears["out_layer.modulation.out_layer"] = GATHER
    linears["audio_out_layer.modulation.out_layer"] = GATHER
    attention_attrs = {f"{branch}.*.attn": ("num_heads",)
                       for branch in ("video_text_transformer_blocks", "audio_text_transformer_blocks")}
    for attention in ("video_dec_block.self_attention", "video_dec_block.cross_attention",
                      "audio_dec_block.self_attention", "audio_dec_block.cross_attention",
                      "va_cross_attention", "av_cross_attention"):
        attention_attrs[f"visual_transformer_blocks.*.{attention}"] = ("num_heads",)
    return TensorParallelPlan(linears=linears, attention_attrs=attention_attrs)


# ------------------------------------------------------------------------------------------------------------
# Kandinsky 6 SR
# ------------------------------------------------------------------------------------------------------------

K6_SR_REFUSAL = "NABLA sparse attention builds its block mask from the queries and keys of the whole video"


@register_cp_plan("Kandinsky6SRTransformer3DModel")
def kandinsky6_sr_cp_plan(model) -> dict:
    raise UnsupportedError(
        f"{type(model).__name__}: its {K6_SR_REFUSAL} (block means of every 64 tokens, then the key blocks that "
        "carry most of the softmax mass over all of them), which a sequence split would change. Context "
        "parallelism (ulysses_size / ring_size) is not supported; use tensor parallelism (tp_size), which splits "
        "heads and keeps each head's mask exact, or spread the pipeline's video tiles over processes."
    )


@register_tp_plan("Kandinsky6SRTransformer3DModel")
def _kandinsky6_sr_tp(model) -> TensorParallelPlan:
    # NABLA's block mask is computed per head, so a head split leaves every head's mask unchanged.
    block = {**_k6_attention("self_attention"), **_K6_FEED_FORWARD, "visual_modulation.out_layer": GATHER}
    linears = present(model, block, "visual_transformer_blocks")
    linears["out_layer.modulation.out_layer"] = GATHER
    return TensorParallelPlan(linears=linears,
                              attention_attrs={"visual_transformer_blocks.*.self_attention": ("num_heads",)})
