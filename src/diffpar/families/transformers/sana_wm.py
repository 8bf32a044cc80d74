"""SANA-WM: the stage-1 world model (`SanaWMTransformer3DModel`) and the stage-2 refiner
(`SanaWMLTX2RefinerTransformer3DModel`).

SanaWMTransformer3DModel is refused for context and tensor parallelism (SANA_WM_REFUSAL), from its forward:
- Most blocks' self-attention is a bidirectional gated-delta-net (GDN) linear attention: a state carried frame by
  frame across the whole video (a forward and a backward scan), after a short depthwise convolution of the keys
  across frames. A sequence split would need that state passed from rank to rank in order, which diffusers'
  context-parallel attention (softmax Ulysses / Ring) does not do.
- The default feed-forward (`GLUMBConvTemp`) reshapes the tokens to (frames, height, width) and convolves each token
  with its spatial (3x3 depthwise) and temporal neighbours, as SANA-Video's does (sana_video.py).
- Tensor parallelism: those convolutions are most of each block's weights, and the GDN gates, short convolutions
  and camera branch are per-channel modules diffpar's engine (which shards Linears) does not split.

SanaWMLTX2RefinerTransformer3DModel has LTX-2's modules under LTX-2's names (the refiner runs the video stream only):
- context parallelism refused (REFINER_REFUSAL): its self-attention attends over a sliding window [attention sink +
  recent history + active block] of K/V kept in a per-layer cache that the pipeline appends to and trims by token
  counts (`history[:, -keep_tokens:]`), and whose sink keys it re-rotates at shifted positions. Split tokens would
  leave each rank a shard of that cache that the pipeline's trimming cuts at the wrong place.
- tensor parallelism: LTX-2's plan (ltx.py). The cache holds K/V before the split into heads, so each rank caches
  its own heads' columns and the pipeline's token trimming is unchanged; the RoPE tables the pipeline builds
  (`build_rotary_emb_for_absolute_positions`, for the active block and for the sink) come out of `rope`, which the
  plan cuts to this rank's columns.
  Parallelize the refiner's pipeline (`SanaWMLTX2Refiner`), not the bare transformer: on a bare model diffpar
  agrees on every forward call's arguments, and the `video_rotary_emb` the caller builds from this rank's `rope` is
  this rank's columns, so the ranks' calls differ by design (RankMismatchError). On a pipeline the agreement wraps
  the pipeline call, whose arguments are the same on every rank.
"""
from __future__ import annotations

from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.ltx import ltx2_tp_plan
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan

SANA_WM_REFUSAL = (
    "its gated-delta-net self-attention carries a state frame by frame across the whole video (after a short "
    "convolution of the keys across frames)"
)


def _refuse_sana_wm(model, what: str):
    ffn = getattr(model.config, "ffn_type", None)
    conv = (" and its feed-forward (GLUMBConvTemp) convolves each token with its spatial and temporal neighbours"
            if ffn == "GLUMBConvTemp" else "")
    raise UnsupportedError(
        f"{what} for {type(model).__name__}: {SANA_WM_REFUSAL}{conv}. A sequence split would need that state passed "
        "between ranks in frame order, which diffusers' context-parallel attention does not do; and its convolutions "
        "and per-channel gates are not Linears that tensor parallelism could shard. Run this transformer whole on "
        "each process and parallelize the text encoder and VAE through extra_parallel_modules; the stage-2 refiner "
        "(SanaWMLTX2RefinerTransformer3DModel) takes tp_size."
    )


@register_cp_plan("SanaWMTransformer3DModel")
def sana_wm_cp_plan(model) -> dict:
    _refuse_sana_wm(model, "context parallelism")


@register_tp_plan("SanaWMTransformer3DModel")
def _sana_wm_tp(model) -> TensorParallelPlan:
    _refuse_sana_wm(model, "tp_size")


REFINER_REFUSAL = (
    "its self-attention attends over a sliding window [attention sink + recent history + active block] of K/V kept "
    "in a per-layer cache that the pipeline trims by token counts"
)


@register_cp_plan("SanaWMLTX2RefinerTransformer3DModel")
def sana_wm_refiner_cp_plan(model) -> dict:
    raise UnsupportedError(
        f"context parallelism for {type(model).__name__}: {REFINER_REFUSAL} (history[:, -keep_tokens:]) and "
        "re-rotates at shifted sink positions; with the tokens split, each rank would cache a shard that this "
        "trimming cuts at the wrong place. Use tp_size (tensor parallelism: heads and the MLP split over the ranks, "
        "the cache holding each rank's heads) for this model instead of ulysses_size / ring_size."
    )


# The same modules under the same names as LTX-2; the refiner's processors reshape by `attn.heads` as LTX-2's do.
register_tp_plan("SanaWMLTX2RefinerTransformer3DModel")(ltx2_tp_plan)
