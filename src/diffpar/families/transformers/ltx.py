"""LTX-Video (`LTXVideoTransformer3DModel`) and LTX-2 (`LTX2VideoTransformer3DModel`): our context-parallel plans
(they replace diffusers' own) and the tensor-parallel plans.

Why not diffusers' `_cp_plan`: it splits the prompt and its padding mask over the ranks and sends the
cross-attention through the context-parallel attention too. Under Ulysses the (B, heads, Q, K) mask the
processor builds keeps every head while the all-to-all leaves each rank a part of them, so attention fails on
shapes ("output with shape [2, 1, 512, 16] doesn't match the broadcast shape [2, 2, 512, 16]").

Our plan: split the video tokens (and a per-token timestep, as the image-to-video pipelines pass) where they enter
the model, the RoPE table (cos, sin) as it leaves `rope`; gather after `proj_out`. The prompt stays whole on every
rank, so the cross-attention (`attn2`: video shard -> every prompt key, with its mask) runs locally, with no
communication, exactly as in one process. Forward change, undone on detach: each `attn2` gets a processor of
its own class that never passes the parallel config on (`local_attention_processors`).
"""
from __future__ import annotations

import copy
import fnmatch

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input, unshard
from diffpar.engines.tp_shard import GATHER, ColumnsOf
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan

_LOCAL_CLASSES: dict[type, type] = {}


def _local_class(cls: type) -> type:
    """`cls` with a parallel config that is always None: attention over keys every rank holds whole, computed
    locally. It still has the attribute, so the engine's setting it (and restoring it) is harmless."""
    if cls not in _LOCAL_CLASSES:
        def _get(self):
            return None

        def _set(self, value):
            pass

        _LOCAL_CLASSES[cls] = type(f"Local{cls.__name__}", (cls,), {
            "__doc__": f"{cls.__name__} computing attention on this rank only (keys whole on every rank).",
            "_parallel_config": property(_get, _set),
        })
    return _LOCAL_CLASSES[cls]


def local_attention_processors(model, patterns: tuple[str, ...], expected: tuple[type, ...], handle, name: str):
    """Every attention under the fnmatch `patterns` computes locally (its processor's class, with no parallel
    config); undo restores the original processor objects. Refuses processors of other classes (IP-Adapter,
    fused projections, ...): diffpar has not checked them."""
    targets, unknown = [], []
    for module_name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not any(fnmatch.fnmatchcase(module_name, p) for p in patterns):
            continue
        if type(processor) in expected:
            targets.append((module, processor))
        elif type(processor) not in _LOCAL_CLASSES.values():
            unknown.append(f"{module_name}: {type(processor).__name__}")
    if unknown:
        raise UnsupportedError(
            f"{type(model).__name__}: these attention processors have no context-parallel version in diffpar: "
            f"{sorted(unknown)}. Context parallelism supports the model's default processors "
            f"({sorted(t.__name__ for t in expected)}). Remove what installed them before enable_cache."
        )

    def restore():
        for module, old in targets:
            module.processor = old

    handle.add(f"{name}: local attention processors", restore)
    for module, old in targets:
        new = copy.copy(old)
        new.__class__ = _local_class(type(old))
        module.processor = new


def prepare_ltx(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    local_attention_processors(model, ("transformer_blocks.*.attn2",), (LTXVideoAttnProcessor,), handle, name)


@register_cp_plan("LTXVideoTransformer3DModel", prepare=prepare_ltx, overrides_native=True)
def ltx_cp_plan(model) -> dict:
    tokens = split_input(split_dim=1, expected_dims=3)
    rope = split_input(split_dim=1, expected_dims=3, split_output=True)
    return {
        # A (B, tokens) timestep (image-to-video: conditioning tokens get timestep 0) is split with the tokens; a
        # (B,) one is not 2-D and diffusers leaves it whole.
        "": {"hidden_states": tokens, "timestep": split_input(split_dim=1, expected_dims=2)},
        "rope": {0: rope, 1: rope},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


_ATTENTION = {"to_q": "colwise", "to_k": "colwise", "to_v": "colwise", "to_out.0": "rowwise",
              "to_gate_logits": "colwise"}  # LTX-2.3's per-head gates: one column per head


def _attention_entries(names) -> tuple[dict, dict]:
    """(linears, RMSNorms across heads) of the attentions `names` in a block."""
    linears = {f"{a}.{k}": v for a in names for k, v in _ATTENTION.items()}
    norms = {f"{a}.{n}": None for a in names for n in ("norm_q", "norm_k")}
    return linears, norms


@register_tp_plan("LTXVideoTransformer3DModel")
def ltx_tp_plan(model) -> TensorParallelPlan:
    # Both attentions, the MLP and the modulation are split. The self-attention's RoPE table (`rope`: cos, sin of
    # shape (B, tokens, inner width), one column per query channel, applied before the split into heads) is cut to
    # the columns of this rank's heads as it leaves `rope`: every block's attn1 splits the same way.
    linears, norms = _attention_entries(("attn1", "attn2"))
    linears.update({"ff.net.0.proj": "colwise", "ff.net.2": "rowwise"})
    linears = present(model, linears, "transformer_blocks")
    linears["time_embed.linear"] = GATHER  # the 6 modulation vectors of every block
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={f"transformer_blocks.*.{a}": ATTN_ATTRS for a in ("attn1", "attn2")},
        sharded_norms=tuple(present(model, norms, "transformer_blocks")),
        sliced_outputs={"rope": ColumnsOf("transformer_blocks.0.attn1.to_q")},
    )


# ------------------------------------------------------------------------------------------------------------
# LTX-2 (audio + video)
# ------------------------------------------------------------------------------------------------------------
# Why not diffusers' plan: the same prompt split as LTX (and the same Ulysses mask failure), and its RoPE entries
# expect (B, T, D) tables, so the "split" RoPE layout (B, H, T, D/2) is left whole while the tokens are split
# ("The size of tensor a (256) must match the size of tensor b (512)").
#
# Our plan: the video tokens are split (with a per-token timestep and the keyframe marker), as are the video RoPE
# tables (`rope`, and `cross_attn_rope`, used by the audio<->video attentions) as they leave their modules; the
# audio stream (short: about 25 tokens a second) and both prompts stay whole on every rank; the video output is
# gathered after `proj_out` (the audio output is the same on every rank). Per block:
# - video self-attention (`attn1`): context-parallel attention;
# - prompt cross-attentions (`attn2`, `audio_attn2`), audio self-attention (`audio_attn1`) and audio-to-video
#   (`audio_to_video_attn`: video-shard queries, whole audio keys): local, no communication;
# - video-to-audio (`video_to_audio_attn`: whole audio queries, video keys): the rank's video tokens and their RoPE
#   rows are gathered from every rank first (one all-gather of a (B, video tokens, dim) tensor), then local.
# Not supported, refused by name: `video_self_attention_mask` (IC-LoRA's (B, T, T) mask over the whole video) and
# `video_keyframes_mask` where the model uses it (optional arguments diffusers' split hooks cannot take).

_LTX2_LOCAL = ("transformer_blocks.*.attn2", "transformer_blocks.*.audio_attn1", "transformer_blocks.*.audio_attn2",
               "transformer_blocks.*.audio_to_video_attn")
_LTX2_GATHER_KEYS = ("transformer_blocks.*.video_to_audio_attn",)


def _rope_token_dim(model) -> tuple[int, int]:
    """(token dim, tensor dims) of LTX-2's RoPE tables: (B, T, D) interleaved, (B, H, T, D/2) split."""
    return (2, 4) if getattr(model.config, "rope_type", "interleaved") == "split" else (1, 3)


_GATHER_KEYS_CLASSES: dict[tuple[type, int], type] = {}


def _gather_keys_class(base: type, token_dim: int) -> type:
    """`base` for the video-to-audio attention: the video keys (and their RoPE rows) of every rank, then local."""
    if (base, token_dim) in _GATHER_KEYS_CLASSES:
        return _GATHER_KEYS_CLASSES[(base, token_dim)]

    def _get(self):
        return None

    def _set(self, value):
        self.__dict__["_gather_config"] = value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 query_rotary_emb=None, key_rotary_emb=None, **kwargs):
        config = self.__dict__.get("_gather_config")
        if config is not None and encoder_hidden_states is not None:
            cp = config.context_parallel_config
            encoder_hidden_states = unshard(encoder_hidden_states, 1, cp)
            if key_rotary_emb is not None:
                key_rotary_emb = tuple(unshard(t, token_dim, cp) for t in key_rotary_emb)
        return base.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, query_rotary_emb,
                             key_rotary_emb, **kwargs)

    cls = type(f"GatherKeys{base.__name__}", (base,), {
        "__doc__": f"{base.__name__} with the video keys gathered from every rank, attention computed locally.",
        "_parallel_config": property(_get, _set),
        "__call__": __call__,
    })
    _GATHER_KEYS_CLASSES[(base, token_dim)] = cls
    return cls


def _refuse_whole_video_inputs(module, args, kwargs):
    if kwargs.get("video_keyframes_mask") is not None and module.config.get("use_keyframes_abs_pos_embedding"):
        raise UnsupportedError(
            f"{type(module).__name__} with video_keyframes_mask under context parallelism: diffpar does not split "
            "this per-token marker with the video tokens yet. Call without it, or run this model without "
            "ulysses_size / ring_size."
        )
    if kwargs.get("video_self_attention_mask") is not None:
        raise UnsupportedError(
            f"{type(module).__name__} with video_self_attention_mask under context parallelism: the (batch, video "
            "tokens, video tokens) mask covers the whole video, and diffpar does not split it with the tokens. "
            "Call without it (IC-LoRA reference conditioning), or run this model without ulysses_size / ring_size."
        )


def prepare_ltx2(model, config, handle, name: str) -> None:
    from diffusers.models.transformers import transformer_ltx2

    expected = tuple(getattr(transformer_ltx2, n) for n in ("LTX2AudioVideoAttnProcessor", "LTX2PerturbedAttnProcessor")
                     if hasattr(transformer_ltx2, n))
    local_attention_processors(model, _LTX2_LOCAL, expected, handle, name)
    token_dim, _ = _rope_token_dim(model)
    targets = []
    handle.add(f"{name}: video-to-audio attention processors", lambda: [setattr(m, "processor", p) for m, p in targets])
    for module_name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is not None and any(fnmatch.fnmatchcase(module_name, p) for p in _LTX2_GATHER_KEYS):
            if type(processor) not in expected:
                raise UnsupportedError(
                    f"{type(model).__name__}: {module_name} has a {type(processor).__name__}, which has no "
                    "context-parallel version in diffpar. Remove what installed it before enable_cache.")
            targets.append((module, processor))
    for module, old in targets:
        new = copy.copy(old)
        new.__class__ = _gather_keys_class(type(old), token_dim)
        module.processor = new
    hooks = []
    handle.add(f"{name}: whole-video input guard", lambda: [h.remove() for h in hooks])
    hooks.append(model.register_forward_pre_hook(_refuse_whole_video_inputs, with_kwargs=True))


@register_cp_plan("LTX2VideoTransformer3DModel", prepare=prepare_ltx2, overrides_native=True)
def ltx2_cp_plan(model) -> dict:
    token_dim, dims = _rope_token_dim(model)
    rope = split_input(split_dim=token_dim, expected_dims=dims, split_output=True)
    return {
        "": {
            "hidden_states": split_input(split_dim=1, expected_dims=3),
            "timestep": split_input(split_dim=1, expected_dims=2),  # (B, video tokens) in image-to-video
        },
        "rope": {0: rope, 1: rope},
        "cross_attn_rope": {0: rope, 1: rope},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("LTX2VideoTransformer3DModel")
def ltx2_tp_plan(model) -> TensorParallelPlan:
    # Every attention, both MLPs and the modulation are split. The RoPE tables are cut to this rank's heads as they
    # leave their modules: `rope` (video self-attention), `audio_rope` (audio self-attention), and the two tables of
    # the audio<->video attentions (`cross_attn_rope`, `cross_attn_audio_rope`, at the audio attention width).
    # Interleaved tables are (B, T, inner width): columns; split tables are (B, heads, T, head_dim / 2): heads.
    attentions = ("attn1", "attn2", "audio_attn1", "audio_attn2", "audio_to_video_attn", "video_to_audio_attn")
    linears, norms = _attention_entries(attentions)
    linears.update({"ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
                    "audio_ff.net.0.proj": "colwise", "audio_ff.net.2": "rowwise"})
    linears = present(model, linears, "transformer_blocks")
    for embed in ("time_embed", "audio_time_embed", "av_cross_attn_video_scale_shift",
                  "av_cross_attn_audio_scale_shift", "av_cross_attn_video_a2v_gate", "av_cross_attn_audio_v2a_gate",
                  "prompt_adaln", "audio_prompt_adaln"):
        if hasattr(model, embed):
            linears[f"{embed}.linear"] = GATHER
    split_layout = getattr(model.config, "rope_type", "interleaved") == "split"
    tables = {"rope": "attn1", "audio_rope": "audio_attn1", "cross_attn_rope": "audio_to_video_attn",
              "cross_attn_audio_rope": "video_to_audio_attn"}
    sliced = {}
    for table, attention in tables.items():
        if hasattr(model, table) and len(model.transformer_blocks):
            first = model.transformer_blocks[0].get_submodule(attention)
            like = f"transformer_blocks.0.{attention}.to_q"
            sliced[table] = ColumnsOf(like, dim=1, unit=first.head_dim) if split_layout else ColumnsOf(like)
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={f"transformer_blocks.*.{a}": ATTN_ATTRS for a in attentions},
        sharded_norms=tuple(present(model, norms, "transformer_blocks")),
        sliced_outputs=sliced,
    )
