"""LongCat-Image (`LongCatImageTransformer2DModel`): FLUX.1's blocks; context- and tensor-parallel plans of
`flux_like` (diffusers ships neither)."""
from __future__ import annotations

from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.flux_like import flux_like_tp_plan, flux_token_split_plan
from diffpar.families.transformers.tp_plans import register_tp_plan


@register_cp_plan("LongCatImageTransformer2DModel")
def longcat_image_cp_plan(model) -> dict:
    return flux_token_split_plan()


register_tp_plan("LongCatImageTransformer2DModel")(flux_like_tp_plan)
