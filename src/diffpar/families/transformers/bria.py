"""Bria (`BriaTransformer2DModel`) and Bria FIBO (`BriaFiboTransformer2DModel`): FLUX.1's blocks; context- and
tensor-parallel plans of `flux_like` (diffusers ships neither).

Bria FIBO also feeds every block one hidden layer of the text encoder (`text_encoder_layers`, a list), projected by
`caption_projection[i]` and concatenated feature-wise to the text stream before block i: each projection's input is
split along the text tokens like the text stream itself. Its pipeline passes a key mask over [all text, all image]
(prompts of different lengths in one batch) through `joint_attention_kwargs`: laid out for the shards by
`flux_like.prepare_mask_reordering` (Ulysses; ring refuses a real one).
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import split_input
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.flux_like import flux_like_tp_plan, flux_token_split_plan, prepare_mask_reordering
from diffpar.engines.tp_shard import GATHER
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan


@register_cp_plan("BriaTransformer2DModel")
def bria_cp_plan(model) -> dict:
    return flux_token_split_plan()


def prepare_bria_fibo(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_bria import BriaAttnProcessor
    from diffusers.models.transformers.transformer_bria_fibo import BriaFiboAttnProcessor

    prepare_mask_reordering(model, handle, name, [BriaFiboAttnProcessor, BriaAttnProcessor])


@register_cp_plan("BriaFiboTransformer2DModel", prepare=prepare_bria_fibo)
def bria_fibo_cp_plan(model) -> dict:
    plan = flux_token_split_plan()
    text_layer = {"caption": split_input(split_dim=1, expected_dims=3)}
    for i in range(len(model.caption_projection)):
        plan[f"caption_projection.{i}"] = text_layer
    return plan


register_tp_plan("BriaTransformer2DModel")(flux_like_tp_plan)


@register_tp_plan("BriaFiboTransformer2DModel")
def _bria_fibo(model) -> TensorParallelPlan:
    """FLUX.1's plan, plus the per-block text-encoder projections (2% of FIBO) computed by slices and gathered."""
    plan = flux_like_tp_plan(model)
    if len(model.caption_projection):
        plan.linears["caption_projection.*.linear"] = GATHER
    return plan
