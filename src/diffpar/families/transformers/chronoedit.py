"""ChronoEdit (`ChronoEditTransformer3DModel`, a Wan 2.1 image-to-video transformer with its own temporal RoPE):
diffusers ships its context-parallel plan (video tokens and RoPE split, the prompt and image context whole, the
cross-attention local); the tensor-parallel plan is Wan's (the same blocks)."""
from __future__ import annotations

from diffpar.families.transformers.tp_plans import register_tp_plan
from diffpar.families.transformers.wan import _wan as wan_tp_plan

register_tp_plan("ChronoEditTransformer3DModel")(wan_tp_plan)
