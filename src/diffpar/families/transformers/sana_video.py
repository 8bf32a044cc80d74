"""SANA-Video (`SanaVideoTransformer3DModel`): refused for context and tensor parallelism, with the reason.

Why, from its forward:
- Each block's feed-forward (`GLUMBTempConv`) reshapes the tokens back to (frames, height, width) and runs a 3x3
  depthwise convolution over every frame and a 3-tap convolution across frames: every token reads its spatial and
  temporal neighbours. A sequence split cuts that grid, and the block cannot even reshape a shard.
- Its self-attention is linear attention (ReLU features), which diffusers' context-parallel attention (softmax
  Ulysses / Ring) does not compute.
- Tensor parallelism could split only the attention projections: the convolutions are most of each block's weights
  and diffpar's tensor-parallel engine shards Linears, so a rank would still hold most of the model.

What a user can do: run SANA-Video on one device per process and parallelize the rest of the pipeline (text
encoder: extra_parallel_modules with tp; VAE: split by rows), or use a video model with a plan (Wan, HunyuanVideo,
CogVideoX, ...).
"""
from __future__ import annotations

from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan

REFUSAL = "its feed-forward convolves each token with its spatial and temporal neighbours"


def _refuse(model, what: str):
    raise UnsupportedError(
        f"{what} for {type(model).__name__}: {REFUSAL} (GLUMBTempConv: 3x3 over each frame, 3 taps across frames), "
        "so a split sequence cannot run a block, and its self-attention is linear attention, which diffusers' "
        "context-parallel attention does not compute; its convolution weights, most of each block, are not Linears "
        "that tensor parallelism could shard. Run this transformer whole on each process, and parallelize the text "
        "encoder and VAE through extra_parallel_modules."
    )


@register_cp_plan("SanaVideoTransformer3DModel")
def sana_video_cp_plan(model) -> dict:
    _refuse(model, "context parallelism")


@register_tp_plan("SanaVideoTransformer3DModel")
def _sana_video_tp(model) -> TensorParallelPlan:
    _refuse(model, "tp_size")
