"""How each pipeline runs classifier-free guidance, and which denoiser arguments carry the batch: data only.

Two patterns (read from each pipeline's denoising loop, diffusers 0.36-0.42.1):
- "batched": the branches are concatenated along the batch (`torch.cat([latents] * 2)`) and the denoiser runs
  once per step; splitting that batch over the cfg groups splits the branches (and any prompt batch).
- "two_calls": the denoiser is called twice per step, inside `transformer.cache_context("cond")` and then
  `cache_context("uncond")` (the uncond call only when guidance is on).

`BATCH_ARGS` lists, per denoiser class, the forward arguments whose first dimension is the sample: tensors
(split along dim 0) and per-sample lists (split by item). Every other argument (position ids such as Flux's
`img_ids` / `txt_ids`, rotary tables, attention kwargs) goes whole to every part.
"""
from __future__ import annotations

from dataclasses import dataclass

from diffpar.families.registry import ClassRegistry

BATCHED = "batched"
TWO_CALLS = "two_calls"


@dataclass(frozen=True)
class BatchArgs:
    tensors: tuple[str, ...]
    lists: tuple[str, ...] = ()


CFG_PATTERNS: ClassRegistry[str] = ClassRegistry("CFG pattern")
BATCH_ARGS: ClassRegistry[BatchArgs] = ClassRegistry("batch arguments")

# One line per pipeline class.
CFG_PATTERNS.register(("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                       "StableDiffusion3InpaintPipeline"), BATCHED)
CFG_PATTERNS.register(("FluxPipeline",), TWO_CALLS)  # true_cfg_scale > 1 with a negative prompt
CFG_PATTERNS.register(("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                       "QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline"),
                      TWO_CALLS)
CFG_PATTERNS.register(("WanPipeline", "WanImageToVideoPipeline"), TWO_CALLS)
CFG_PATTERNS.register(("HunyuanVideoPipeline",), TWO_CALLS)  # true_cfg_scale > 1 with a negative prompt

# One line per denoiser class.
BATCH_ARGS.register(("SD3Transformer2DModel",),
                    BatchArgs(("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")))
BATCH_ARGS.register(("FluxTransformer2DModel",),
                    BatchArgs(("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                               "guidance")))
BATCH_ARGS.register(("WanTransformer3DModel",),
                    BatchArgs(("hidden_states", "encoder_hidden_states", "timestep", "encoder_hidden_states_image")))
BATCH_ARGS.register(("QwenImageTransformer2DModel",),
                    BatchArgs(("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep",
                               "guidance"), lists=("img_shapes", "txt_seq_lens")))


def cfg_pattern_for(pipeline) -> str | None:
    return CFG_PATTERNS.lookup(pipeline)


def batch_args_for(model) -> BatchArgs | None:
    return BATCH_ARGS.lookup(model)


def recognised_pipelines() -> list[str]:
    return CFG_PATTERNS.names()
