"""DreamLite (`DreamLiteTransformer2DModel`, the attention stage inside the DreamLite U-Net): context- and
tensor-parallel plans; diffusers ships neither.

CP plan: the input GroupNorm (`norm`) takes statistics over the whole latent and the output reshape needs every
token, so the split covers exactly the blocks: the tokens are split as they enter the first block and gathered as
they leave the last one (with one block, `transformer_blocks.*` names that same block for the gather, since a plan
has one entry per name). Inside a block everything is per token except attention: self-attention (`attn1`) goes
through diffusers' dispatcher with the parallel config; cross-attention (`attn2`) attends from the token shard to
the whole prompt locally, with the prompt mask as given. The U-Net's GQA processor (`DreamLiteAttnProcessor2_0`)
repeats key/value heads to the query heads before attention, so Ulysses splits all three by the same heads.
Refused: GLIGEN fusers (`attention_type` "gated"), which attend over the image tokens and the objects at once,
and positional embeddings by token index (neither is used by DreamLite).

The DreamLite U-Net (`DreamLiteUNetModel`, the DreamLite pipeline's denoiser) gets the union of its attention
stages' CP plans: attention, the quadratic part, is split stage by stage; ResNets, convolutions and resampling run
whole on every rank. No TP plan for it (its stages have one key/value head, see below).

TP plan: each block's attention by heads (queries, keys, values; outputs by rows), its GEGLU MLP by width, each half
of the fused projection split alike; the projections in and out (1x1 convolutions) by output channels, outputs
gathered. GroupNorm stays whole. With grouped-query
attention each rank needs whole key/value heads (the TP engine checks it and names the tp that works). With ONE
key/value head (num_kv_heads=1, the DreamLite U-Net's default) the plan keeps the key/value projections whole on
every rank (exact: the processor repeats that head to the rank's query heads); the engine deals key/value heads
fewer than ranks to every rank that reads them, so tp 2 and 4 run (tested).
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import (
    ContextParallelAttnProcessor2_0,
    check_generic_attention,
    generic_cp_processors,
    grouped_heads,
    repeat_kv_heads,
    replace_attention_processors,
)
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


def _refuse_self_attention_mask(mask: torch.Tensor | None) -> None:
    """A self-attention mask that masks nothing is exact to drop; one that masks keys cannot be laid over keys
    sharded across ranks (the DreamLite U-Net never passes one)."""
    if mask is None:
        return
    keeps_all = bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())
    if not keeps_all:
        raise UnsupportedError(
            "ContextParallelDreamLiteAttnProcessor: an `attention_mask` over the image tokens reached self-attention "
            "under context parallelism, and its keys are split across ranks. Call the model without it (the "
            "DreamLite U-Net passes none), or run without ulysses_size / ring_size."
        )


class ContextParallelDreamLiteAttnProcessor(ContextParallelAttnProcessor2_0):
    """diffusers' `DreamLiteAttnProcessor2_0` (GQA: key/value heads repeated to the query heads, per-head q/k
    norm): `AttnProcessor2_0`'s context-parallel version (self-attention through the dispatcher with the parallel
    config, cross-attention to the prompt locally) with DreamLite's heads."""

    def _heads(self, attn, query, key, value, batch_size):
        query, key, value = grouped_heads(attn, query, key, value, batch_size)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key, value = repeat_kv_heads(key, value, attn.heads)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)

    def _refuse_self_attention_mask(self, mask: torch.Tensor | None) -> None:
        _refuse_self_attention_mask(mask)


def _dreamlite_processors() -> dict[type, type]:
    from diffusers.models.unets.unet_dreamlite import DreamLiteAttnProcessor2_0

    return {**generic_cp_processors(), DreamLiteAttnProcessor2_0: ContextParallelDreamLiteAttnProcessor}


def prepare_dreamlite(model, config, handle, name: str) -> None:
    replace_attention_processors(model, _dreamlite_processors(), handle, name, type(model).__name__,
                                 within=("transformer_blocks",))


def _check_blocks(model, label: str) -> None:
    if not len(model.transformer_blocks):
        raise UnsupportedError(f"{label} has no transformer blocks to parallelize.")
    for index, block in enumerate(model.transformer_blocks):
        if getattr(block, "fuser", None) is not None:
            raise UnsupportedError(
                f"{label}: transformer_blocks.{index} has a GLIGEN fuser (attention_type="
                f"{model.config.attention_type!r}), which attends over the image tokens and the grounding objects "
                "together; diffpar has no context-parallel version of it. Use attention_type='default' (DreamLite's), "
                "or run without ulysses_size / ring_size."
            )
        if block.pos_embed is not None:
            raise UnsupportedError(
                f"{label}: transformer_blocks.{index} adds a positional embedding by token index inside the block, "
                "which a token shard would take from the wrong rows. Run without ulysses_size / ring_size."
            )


@register_cp_plan("DreamLiteTransformer2DModel", prepare=prepare_dreamlite)
def dreamlite_cp_plan(model) -> dict:
    label = type(model).__name__
    _check_blocks(model, label)
    check_generic_attention(model, label)
    last = len(model.transformer_blocks) - 1
    # A plan holds one entry per name: with a single block, the wildcard names that block for the gather.
    gather_at = f"transformer_blocks.{last}" if last else "transformer_blocks.*"
    return {
        "transformer_blocks.0": {"hidden_states": split_input(split_dim=1, expected_dims=3)},
        gather_at: gather_output(gather_dim=1, expected_dims=3),
    }


def _attention_entries(model, attn_name: str) -> tuple[dict, tuple[str, ...]]:
    """The linears and divided attributes of one attention of the blocks, split by heads. Keys/values too, except
    with ONE key/value head (MQA): those projections stay whole on every rank and the processor repeats that head
    to the rank's query heads (exact)."""
    attn = getattr(model.transformer_blocks[0], attn_name, None)
    if attn is None:
        return {}, ()
    head_dim = attn.inner_dim // attn.heads
    weight = getattr(attn.norm_q, "weight", None)
    if weight is not None and weight.numel() != head_dim:
        raise UnsupportedError(
            f"{type(model).__name__}: {attn_name} normalizes q/k across all heads (qk_norm '*_across_heads'), "
            "which diffpar's tensor parallelism does not split for this model. DreamLite uses qk_norm='rms_norm' "
            "(per head); run this configuration with ulysses_size / ring_size instead."
        )
    entries = {f"{attn_name}.to_q": "colwise", f"{attn_name}.to_out.0": "rowwise"}
    if attn.inner_kv_dim // head_dim == 1:
        return entries, ("heads", "inner_dim")
    entries.update({f"{attn_name}.to_k": "colwise", f"{attn_name}.to_v": "colwise"})
    return entries, ATTN_ATTRS


@register_tp_plan("DreamLiteTransformer2DModel")
def dreamlite_tp_plan(model) -> TensorParallelPlan:
    label = type(model).__name__
    if not len(model.transformer_blocks):
        raise UnsupportedError(f"{label} has no transformer blocks to parallelize.")
    block = model.transformer_blocks[0]
    if getattr(block, "fuser", None) is not None:
        raise UnsupportedError(f"{label}: GLIGEN fusers (attention_type='gated') have no tensor-parallel plan here.")
    up = block.ff.net[0]
    # GEGLU's projection holds [hidden, gate]: each half split across ranks.
    ff_up = Packed("colwise", (up.proj.out_features // 2,) * 2) if type(up).__name__ == "GEGLU" else "colwise"
    per_block = {"ff.net.0.proj": ff_up, "ff.net.2": "rowwise"}
    attrs = {}
    for attn_name in ("attn1", "attn2"):
        entries, attn_attrs = _attention_entries(model, attn_name)
        per_block.update(entries)
        if entries:
            attrs[f"transformer_blocks.*.{attn_name}"] = attn_attrs
    linears = present(model, per_block, "transformer_blocks")
    # The projections in and out (1x1 convolutions or Linears, about 8% of a stage's weights): split by output
    # channels, outputs gathered; whole on every rank they kept 0.543 / 0.315 of the weights per rank at tp 2 / 4.
    for name in ("proj_in", "proj_out"):
        layer = getattr(model, name, None)
        if isinstance(layer, torch.nn.Linear) or (
                isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1) and layer.groups == 1):
            linears[name] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)


def _attention_stages(model) -> list[tuple[str, torch.nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if type(module).__name__ == "DreamLiteTransformer2DModel"]


def prepare_dreamlite_unet(model, config, handle, name: str) -> None:
    stages = tuple(f"{stage}." for stage, _ in _attention_stages(model))
    replace_attention_processors(model, _dreamlite_processors(), handle, name, type(model).__name__, within=stages)


@register_cp_plan("DreamLiteUNetModel", prepare=prepare_dreamlite_unet)
def dreamlite_unet_cp_plan(model) -> dict:
    """The DreamLite U-Net: each attention stage (a DreamLiteTransformer2DModel) splits its tokens as they enter
    its first block and gathers them as they leave its last, as the stage's own plan does; the ResNets, convolutions,
    GroupNorms and resampling between stages run on the whole latent on every rank (a convolution needs its
    neighbours' rows and a GroupNorm the whole image). Only attention, the quadratic part, is split."""
    stages = _attention_stages(model)
    if not stages:
        raise UnsupportedError(f"{type(model).__name__} has no attention stage to parallelize.")
    plan = {}
    for stage_name, stage in stages:
        plan.update({f"{stage_name}.{key}": entry for key, entry in dreamlite_cp_plan(stage).items()})
    return plan
