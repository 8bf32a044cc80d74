"""Motif-Video (`MotifVideoTransformer3DModel`): context- and tensor-parallel plans; diffusers ships neither.

HunyuanVideo's layout (hunyuan_video.py): dual-stream blocks, then single-stream blocks, joint attention over
[video tokens, prompt tokens] with a key-padding mask the forward builds over [all video, all prompt]. Plan: the
video and prompt tokens are split where they enter the first block, the RoPE table (cos, sin) as it leaves `rope`;
gather after `proj_out`. Each joint attention gets HunyuanVideo's treatment of the mask (an all-True mask becomes
none; a real padding mask is laid out in the order plain Ulysses gathers keys, also where a call whose lengths
the degree does not divide took the uneven path by itself); Ring and the *_anything options cannot apply a mask
across ranks, so a padded prompt is refused there, at the call, naming the fix.

Differences from HunyuanVideo, each handled here:
- The optional text cross-attention (`cross_attn`, `enable_text_cross_attention_*`): queries from the video shard,
  keys from the prompt part of the block's text stream, found by slicing off `image_embed_seq_len` leading image
  tokens, with the mask's last columns. Each rank holds only a shard of that stream, so the slice would be wrong:
  its processor gathers the whole text stream first (one all-gather of a (B, prompt tokens, dim) tensor), then
  attends locally with the whole mask, exactly as one process.
- Decoder single blocks (`num_decoder_layers`): they restart from a copy of the embedded video taken before the
  blocks (whole on every rank), attending jointly to the encoder's output (already split). That copy is split
  where it enters the first decoder block.

Tensor parallelism: HunyuanVideo's split (heads, MLPs, modulations gathered) plus the cross-attentions. Refused
where single blocks have a cross-attention (`enable_text_cross_attention_single`): it takes the single block's
attention output before any projection as its query input, which a head split leaves in pieces.
"""
from __future__ import annotations

import copy

from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks
from diffpar.compat.diffusers_cp_hooks import gather_output, split_input, unshard
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.hunyuan_video import mask_for_sharded_keys, single_block_linears
from diffpar.families.transformers.sd3 import per_block, replace_attention_processors
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    DUAL_STREAM_FF,
    DUAL_STREAM_MODULATION,
    JOINT_ATTENTION,
    TensorParallelPlan,
    register_tp_plan,
)

_BLOCK_STACKS = ("transformer_blocks", "single_transformer_blocks")


def _joint_processor_class(seen: dict):
    """Built lazily (the base class comes from the installed diffusers). `seen["text_tokens"]`: this call's whole
    text stream length ([image embeddings, prompt]), which the mask covers after all the video."""
    from diffusers.models.transformers.transformer_motif_video import MotifVideoAttnProcessor2_0

    class MotifVideoContextParallelAttnProcessor(MotifVideoAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if attention_mask is not None and self._parallel_config is not None:
                if bool(attention_mask.all()):
                    attention_mask = None  # masks nothing; the ring cannot take one
                else:
                    _refuse_mask_layout(self._parallel_config.context_parallel_config, seen["ulysses_anything"])
                    attention_mask = mask_for_sharded_keys(
                        attention_mask, hidden_states.shape[1], encoder_hidden_states.shape[1],
                        self._parallel_config, seen.get("text_tokens"))
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    return MotifVideoContextParallelAttnProcessor


def _refuse_mask_layout(cp, ulysses_anything: bool) -> None:
    """`ulysses_anything`: the user's option. The uneven path a call takes by itself (0.38+, a length the degree
    does not divide) is not refused: the mask laid out for the uneven key order is exact there (as HunyuanVideo's)."""
    if cp.ring_degree > 1:
        mode, fix = "ring attention", "use ulysses_size instead of ring_size"
    elif ulysses_anything:
        mode, fix = "ulysses_anything", "use ulysses_size without ulysses_anything"
    elif not context_parallel_attention_takes_masks():
        mode, fix = "this diffusers release's context-parallel attention", "upgrade diffusers (0.37+ takes masks)"
    else:
        return
    raise UnsupportedError(
        "MotifVideoTransformer3DModel with context parallelism: encoder_attention_mask masks padded prompt tokens, "
        f"and {mode} cannot apply a key mask across ranks. Pass prompts without padding (no mask, or one that "
        f"masks nothing), or {fix}."
    )


_GATHER_TEXT_CLASSES: dict[type, type] = {}


def _gather_text_class(base: type) -> type:
    """`base` for the text cross-attention: the whole text stream from every rank, then attention locally."""
    if base in _GATHER_TEXT_CLASSES:
        return _GATHER_TEXT_CLASSES[base]

    def _get(self):
        return None

    def _set(self, value):
        self.__dict__["_gather_config"] = value

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                 image_embed_seq_len=0):
        config = self.__dict__.get("_gather_config")
        if config is not None:
            encoder_hidden_states = unshard(encoder_hidden_states.contiguous(), 1, config.context_parallel_config)
        return base.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                             image_embed_seq_len)

    cls = type(f"GatherText{base.__name__}", (base,), {
        "__doc__": f"{base.__name__} with the whole text stream gathered from every rank, attention computed locally.",
        "_parallel_config": property(_get, _set),
        "__call__": __call__,
    })
    _GATHER_TEXT_CLASSES[base] = cls
    return cls


def _record_text_length(seen: dict):
    def hook(module, args, kwargs):
        # forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, image_embeds, ...)
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        image = kwargs.get("image_embeds", args[4] if len(args) > 4 else None)
        seen["text_tokens"] = (text.shape[1] if text is not None else 0) + (image.shape[1] if image is not None else 0)

    return hook


def prepare_motif_video(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_motif_video import (
        MotifVideoAttnProcessor2_0,
        MotifVideoCrossAttnProcessor2_0,
    )

    label = type(model).__name__
    seen: dict = {"ulysses_anything": bool(config.ulysses_anything)}
    joint = tuple(f"{stack}.{i}.attn" for stack in _BLOCK_STACKS for i in range(len(getattr(model, stack))))
    replace_attention_processors(model, {MotifVideoAttnProcessor2_0: _joint_processor_class(seen)}, handle, name,
                                 label, within=joint)
    targets = []
    handle.add(f"{name}: text cross-attention processors", lambda: [setattr(m, "processor", p) for m, p in targets])
    for stack in _BLOCK_STACKS:
        for i, block in enumerate(getattr(model, stack)):
            cross = getattr(block, "cross_attn", None)
            if cross is None:
                continue
            if type(cross.processor) is not MotifVideoCrossAttnProcessor2_0:
                raise UnsupportedError(
                    f"{label}: {stack}.{i}.cross_attn has a {type(cross.processor).__name__}, which has no "
                    "context-parallel version in diffpar. Remove what installed it before enable_cache.")
            targets.append((cross, cross.processor))
    for cross, old in targets:
        new = copy.copy(old)
        new.__class__ = _gather_text_class(type(old))
        cross.processor = new
    hooks = []
    handle.add(f"{name}: record the text stream length", lambda: [h.remove() for h in hooks])
    hooks.append(model.register_forward_pre_hook(_record_text_length(seen), with_kwargs=True))


@register_cp_plan("MotifVideoTransformer3DModel", prepare=prepare_motif_video)
def motif_video_cp_plan(model) -> dict:
    decoders = int(getattr(model.config, "num_decoder_layers", 0) or 0)
    singles = len(model.single_transformer_blocks)
    first = "transformer_blocks.0" if len(model.transformer_blocks) else (
        "single_transformer_blocks.0" if singles > decoders else None)
    if first is None:
        raise UnsupportedError(f"{type(model).__name__} has no encoder blocks to parallelize (every block is a "
                               "decoder block).")
    tokens = split_input(split_dim=1, expected_dims=3)
    rope = split_input(split_dim=0, expected_dims=2, split_output=True)
    plan = {
        "rope": {0: rope, 1: rope},
        first: {"hidden_states": tokens, "encoder_hidden_states": tokens},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }
    if decoders:
        # The decoder restarts from the embedded video copied before the blocks (whole): split it as it enters.
        plan[f"single_transformer_blocks.{singles - decoders}"] = {"hidden_states": tokens}
    return plan


@register_tp_plan("MotifVideoTransformer3DModel")
def motif_video_tp_plan(model) -> TensorParallelPlan:
    if any(getattr(block, "cross_attn", None) is not None for block in model.single_transformer_blocks):
        raise UnsupportedError(
            f"{type(model).__name__} with enable_text_cross_attention_single=True: the single blocks' text "
            "cross-attention takes the attention output before its projection as query input, which tensor "
            "parallelism leaves split by heads across ranks. Use context parallelism (ulysses_size / ring_size) "
            "for this model."
        )
    cross = {"cross_attn.to_q": "colwise", "cross_attn.to_k": "colwise", "cross_attn.to_v": "colwise",
             "cross_attn.to_out.0": "rowwise"}
    double = {**JOINT_ATTENTION, **cross, **DUAL_STREAM_FF, **DUAL_STREAM_MODULATION}
    linears = per_block(model, "transformer_blocks", double)
    linears.update(single_block_linears(model))
    linears["norm_out.linear"] = GATHER
    attrs = {f"{stack}.*.attn": ATTN_ATTRS for stack in _BLOCK_STACKS if len(getattr(model, stack))}
    if any(getattr(block, "cross_attn", None) is not None for block in model.transformer_blocks):
        attrs["transformer_blocks.*.cross_attn"] = ATTN_ATTRS
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
