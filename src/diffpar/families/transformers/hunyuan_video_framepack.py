"""HunyuanVideo Framepack (`HunyuanVideoFramepackTransformer3DModel`): context- and tensor-parallel plans; diffusers
ships neither.

HunyuanVideo's blocks (hunyuan_video.py) on a sequence the forward packs itself: [4x history, 2x history, clean
history, noisy latents] tokens, with their RoPE tables concatenated the same way, then the prompt ([image
projection, refined text]). Nothing of that passes through a module, so the plan splits where it first does: the
video tokens and the prompt at the first block, and the RoPE table at every block (the forward passes the whole
table to each). The token refiner runs whole before the split (it pools over the prompt).

After the blocks the forward keeps the last `frames x height x width` video tokens (dropping the history) by
position from the end, so the last block's video output is gathered (a forward hook, removed on detach); the final
norm and projection then run whole.

Masks: with one video per call (the pipeline's case) the forward itself cuts the prompt to its real tokens and
passes no mask. With several, it builds a key mask over [all video, all prompt]; each block's attention gets
hunyuan_video.py's processor, which lays that mask out in Ulysses' gather order. Ring attention cannot apply it:
refused with the reason (run one video per call, or use ulysses_size).
"""
from __future__ import annotations

import inspect

from diffpar.compat.diffusers_cp_hooks import split_input
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.consisid import gather_block_outputs
from diffpar.families.transformers.hunyuan_video import _processor_class
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    DUAL_STREAM_BLOCK,
    TensorParallelPlan,
    present,
    register_tp_plan,
)

_STACKS = ("transformer_blocks", "single_transformer_blocks")


def _stacks(model) -> list[str]:
    return [stack for stack in _STACKS if len(getattr(model, stack))]


def _record_prompt_length(kept: dict):
    """Pre-hook of the first block (before the split hooks): the whole prompt's length, which the processor's mask
    layout needs where the split is uneven."""

    def hook(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        kept["text_tokens"] = text.shape[1]

    return hook


def prepare_framepack(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    kept: dict = {}
    replace_attention_processors(model, {HunyuanVideoAttnProcessor2_0: _processor_class(kept)}, handle, name,
                                 type(model).__name__, within=_STACKS)
    stacks = _stacks(model)
    first, last = getattr(model, stacks[0])[0], getattr(model, stacks[-1])[-1]
    hooks = []
    handle.add(f"{name}: record the prompt length", lambda: [h.remove() for h in hooks])
    hooks.append(first.register_forward_pre_hook(_record_prompt_length(kept), with_kwargs=True))
    gather_block_outputs(model, last, (0,), handle, name, "gather the last block's video tokens")


@register_cp_plan("HunyuanVideoFramepackTransformer3DModel", prepare=prepare_framepack,
                  hook_gathers=("last block of the last stack (video tokens)",))
def framepack_cp_plan(model) -> dict:
    stacks = _stacks(model)
    if not stacks:
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    tokens = split_input(split_dim=1, expected_dims=3)
    table = [split_input(split_dim=0, expected_dims=2), split_input(split_dim=0, expected_dims=2)]
    plan = {f"{stacks[0]}.0": {"hidden_states": tokens, "encoder_hidden_states": tokens}}
    for stack in stacks:
        plan[f"{stack}.*"] = {_rope_argument(getattr(model, stack)[0]): table}
    return plan


def _rope_argument(block) -> str:
    """The blocks name their RoPE argument differently (double: `freqs_cis`, single: `image_rotary_emb`)."""
    params = inspect.signature(type(block).forward).parameters
    return "freqs_cis" if "freqs_cis" in params else "image_rotary_emb"


def hunyuan_video_blocks_tp(model) -> tuple[dict, dict]:
    """Linears and attention attributes of HunyuanVideo's double and single blocks and token refiner."""
    linears = present(model, DUAL_STREAM_BLOCK, "transformer_blocks")
    attrs = {"transformer_blocks.*.attn": ATTN_ATTRS}
    if len(model.single_transformer_blocks):
        block = model.single_transformer_blocks[0]
        inner = block.attn.inner_dim
        single = {
            "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "proj_mlp": "colwise",
            # proj_out reads cat([attention output, MLP hidden]): two column-sharded streams.
            "proj_out": Packed("rowwise", (inner, block.proj_mlp.out_features)),
            "norm.linear": GATHER,
        }
        linears.update(present(model, single, "single_transformer_blocks"))
        attrs["single_transformer_blocks.*.attn"] = ATTN_ATTRS
    refiner = model.context_embedder.token_refiner
    refiner_block = {
        "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "attn.to_out.0": "rowwise",
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise", "norm_out.linear": GATHER,
    }
    prefix = "context_embedder.token_refiner."
    linears.update({prefix + k: v for k, v in present(refiner, refiner_block, "refiner_blocks").items()})
    attrs[prefix + "refiner_blocks.*.attn"] = ATTN_ATTRS
    linears["norm_out.linear"] = GATHER
    return linears, attrs


@register_tp_plan("HunyuanVideoFramepackTransformer3DModel")
def _framepack_tp(model) -> TensorParallelPlan:
    linears, attrs = hunyuan_video_blocks_tp(model)
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
