"""Latte (`LatteTransformer3DModel`): context- and tensor-parallel plans; diffusers ships none.

Latte alternates spatial blocks (each frame's patches attend to each other: batch = videos x frames, sequence =
patches) and temporal blocks (each patch position attends across frames: batch = videos x patches, sequence =
frames). The plan splits the patches of every frame over the ranks as they leave `pos_embed` (positions are added
inside it, per frame, so its output splits exactly):
- spatial self-attention runs over a split sequence: context-parallel (Ulysses / Ring), through the shared
  processors of attention_processors.py (cross-attention to the prompt stays local there);
- temporal attention runs over frames, the axis the split does not touch: each rank holds every frame of its
  patches, so it runs locally with its own processor, no communication;
- the forward repeats the timestep embedding once per patch for the temporal blocks (rows = videos x all patches);
  a pre-hook on each temporal block (removed on detach) keeps the rows of this rank's patches (every row of a video
  is the same vector, so the first ones are exact).
Gather after `proj_out`.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import check_generic_attention, prepare_generic_attention
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan

_TIMESTEP_ARG = 4  # BasicTransformerBlock.forward(hidden_states, attention_mask, encoder_hidden_states,
#                    encoder_attention_mask, timestep, ...), called positionally by Latte's forward


def _record_batch(seen: dict):
    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        seen["videos"] = hidden.shape[0]

    return hook


def _local_timestep_rows(seen: dict):
    def hook(module, args, kwargs):
        rows = args[0].shape[0] if args else kwargs["hidden_states"].shape[0]
        in_kwargs = "timestep" in kwargs
        timestep = kwargs["timestep"] if in_kwargs else (args[_TIMESTEP_ARG] if len(args) > _TIMESTEP_ARG else None)
        if timestep is None or timestep.shape[0] == rows:
            return None
        videos = seen["videos"]
        local = timestep.reshape(videos, -1, timestep.shape[-1])[:, : rows // videos].reshape(rows, -1)
        if in_kwargs:
            return args, {**kwargs, "timestep": local}
        return (*args[:_TIMESTEP_ARG], local, *args[_TIMESTEP_ARG + 1:]), kwargs

    return hook


def prepare_latte(model, config, handle, name: str) -> None:
    prepare_generic_attention(model, config, handle, name, within=("transformer_blocks",))
    seen: dict = {}
    hooks = []
    handle.add(f"{name}: temporal blocks take this rank's timestep rows", lambda: [h.remove() for h in hooks])
    hooks.append(model.register_forward_pre_hook(_record_batch(seen), with_kwargs=True))
    for block in model.temporal_transformer_blocks:
        hooks.append(block.register_forward_pre_hook(_local_timestep_rows(seen), with_kwargs=True))


@register_cp_plan("LatteTransformer3DModel", prepare=prepare_latte)
def latte_cp_plan(model) -> dict:
    if not len(model.transformer_blocks):
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    if model.adaln_single is None:
        raise UnsupportedError(
            f"{type(model).__name__} without ada_norm_single: its forward infers the image size from the token count "
            "after the blocks, which a split changes. Context parallelism supports norm_type='ada_norm_single' "
            "(every Latte checkpoint)."
        )
    check_generic_attention(model, type(model).__name__)
    return {
        "pos_embed": {0: split_input(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("LatteTransformer3DModel")
def _latte_tp(model) -> TensorParallelPlan:
    block = model.transformer_blocks[0]
    up = block.ff.net[0]
    # GEGLU's projection holds [hidden, gate]: each half split across ranks.
    ff_up = Packed("colwise", (up.proj.out_features // 2,) * 2) if type(up).__name__ == "GEGLU" else "colwise"
    per_block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise", "attn2.to_out.0": "rowwise",
        "ff.net.0.proj": ff_up, "ff.net.2": "rowwise",
    }
    linears = present(model, per_block, "transformer_blocks")
    linears.update(present(model, per_block, "temporal_transformer_blocks"))
    linears["adaln_single.linear"] = GATHER
    if getattr(model, "caption_projection", None) is not None:
        linears.update({"caption_projection.linear_1": "colwise", "caption_projection.linear_2": "rowwise"})
    attrs = {f"{stack}.*.{attn}": ATTN_ATTRS for stack in ("transformer_blocks", "temporal_transformer_blocks")
             for attn in ("attn1", "attn2") if getattr(getattr(model, stack)[0], attn, None) is not None}
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
