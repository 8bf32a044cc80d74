"""Chroma (`ChromaTransformer2DModel`): context- and tensor-parallel plans; diffusers ships neither.

Chroma is FLUX.1's blocks (`FluxAttention` + `FluxAttnProcessor`, which attends through diffusers' dispatcher)
with the modulation computed once for all blocks (`distilled_guidance_layer`) and an attention mask.

Context parallel: FLUX.1's split (diffusers' `_cp_plan` for Flux): the image and text tokens and their position
ids are split as they enter the model, so each rank holds [its text shard, its image shard] and the RoPE table of
exactly those tokens; the output is gathered after `proj_out`. Every block works token by token outside attention.

The mask: the pipeline passes one over [all text, all image] tokens (1 for real prompt tokens and the image, 0 for
prompt padding; a float mask that diffusers adds to the attention logits), and each block turns it into a
(B, 1, N, N) query x key mask. After the split the whole mask no longer matches the tokens' order. One forward
change, undone on detach: `flux_like.prepare_mask_reordering` (a mask that masks nothing is dropped, a real one is
reordered for Ulysses, rows and columns, and refused by the ring).
"""
from __future__ import annotations

from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.flux_like import flux_like_tp_plan, flux_token_split_plan, prepare_mask_reordering
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan
from diffpar.engines.tp_shard import GATHER


def prepare_chroma(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    prepare_mask_reordering(model, handle, name, [FluxAttnProcessor])


@register_cp_plan("ChromaTransformer2DModel", prepare=prepare_chroma)
def chroma_cp_plan(model) -> dict:
    return flux_token_split_plan()


@register_tp_plan("ChromaTransformer2DModel")
def _chroma(model) -> TensorParallelPlan:
    """FLUX.1's blocks; the modulation is one MLP for all blocks (the approximator), whose layers are split like
    a feed-forward's, and the blocks' own norms have no weights."""
    plan = flux_like_tp_plan(model)
    linears = {k: v for k, v in plan.linears.items() if v != GATHER}
    if len(model.distilled_guidance_layer.layers):
        linears["distilled_guidance_layer.layers.*.linear_1"] = "colwise"
        linears["distilled_guidance_layer.layers.*.linear_2"] = "rowwise"
    return TensorParallelPlan(linears=linears, attention_attrs=plan.attention_attrs)
