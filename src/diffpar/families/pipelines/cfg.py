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

import inspect
from dataclasses import dataclass

from diffpar.families.registry import ClassRegistry

BATCHED = "batched"
TWO_CALLS = "two_calls"


@dataclass(frozen=True)
class BatchArgs:
    tensors: tuple[str, ...]
    lists: tuple[str, ...] = ()


@dataclass(frozen=True)
class GuidanceFlag:
    """Where a two-call pipeline says, before its first denoiser call, whether this call runs the uncond branch:
    a local variable of its `__call__` ("local") or a public attribute or property ("attribute")."""

    source: str
    name: str


CFG_PATTERNS: ClassRegistry[str] = ClassRegistry("CFG pattern")
GUIDANCE_FLAGS: ClassRegistry[GuidanceFlag] = ClassRegistry("guidance flag")
BATCH_ARGS: ClassRegistry[BatchArgs] = ClassRegistry("batch arguments")

# One line per pipeline class.
CFG_PATTERNS.register(("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                       "StableDiffusion3InpaintPipeline"), BATCHED)
CFG_PATTERNS.register(("LTXPipeline", "LTXImageToVideoPipeline"), BATCHED)
CFG_PATTERNS.register(("FluxPipeline",), TWO_CALLS)  # true_cfg_scale > 1 with a negative prompt
CFG_PATTERNS.register(("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline",
                       "QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline"),
                      TWO_CALLS)
CFG_PATTERNS.register(("WanPipeline", "WanImageToVideoPipeline"), TWO_CALLS)
CFG_PATTERNS.register(("HunyuanVideoPipeline",), TWO_CALLS)  # true_cfg_scale > 1 with a negative prompt

# One line per two-call pipeline family: what decides its uncond call (read from each denoising loop).
GUIDANCE_FLAGS.register(("FluxPipeline", "HunyuanVideoPipeline", "QwenImagePipeline", "QwenImageImg2ImgPipeline",
                         "QwenImageInpaintPipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline",
                         "QwenImageEditInpaintPipeline"), GuidanceFlag("local", "do_true_cfg"))
GUIDANCE_FLAGS.register(("WanPipeline", "WanImageToVideoPipeline"),
                        GuidanceFlag("attribute", "do_classifier_free_guidance"))

# One line per denoiser class.
BATCH_ARGS.register(("SD3Transformer2DModel",),
                    BatchArgs(("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")))
BATCH_ARGS.register(("LTXVideoTransformer3DModel",),  # image-to-video: a per-token timestep (batch, tokens)
                    BatchArgs(("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask",
                               "video_coords")))
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



def guidance_probe_for(pipeline):
    """`guided(pipeline) -> bool | None` for the cfg engine, asked as each pipeline call starts (its prepare_latents,
    inside `__call__`, after the guidance flag is set), or None where the class has no registered flag. None from the
    probe (flag not found, e.g. another diffusers release) makes the call learn in its first step, as before; a
    wrong True is refused by the engine on every rank (two cond calls in a row), never blended."""
    flag = GUIDANCE_FLAGS.lookup(pipeline)
    if flag is None:
        return None
    if flag.source == "attribute":
        def from_attribute(pipe):
            value = getattr(pipe, flag.name, None)
            return value if isinstance(value, bool) else None

        return from_attribute

    def from_call_locals(pipe):
        frame = inspect.currentframe()
        try:
            while frame is not None:
                if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is pipe:
                    value = frame.f_locals.get(flag.name)
                    return value if isinstance(value, bool) else None
                frame = frame.f_back
            return None
        finally:
            del frame

    return from_call_locals
