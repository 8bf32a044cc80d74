"""Wan derivatives without a diffusers context-parallel plan: Wan VACE (`WanVACETransformer3DModel`), SkyReels-V2
(`SkyReelsV2Transformer3DModel`), Wan Animate (`WanAnimateTransformer3DModel`) and Wan Animate 2
(`WanAnimate2Transformer3DModel`). Their blocks are Wan's, so each plan is Wan's (video tokens and the RoPE table
split, the prompt and image context whole, cross-attention local) plus what the variant adds. Tensor parallelism:
Wan's plan, applied to every block stack.
"""
from __future__ import annotations

import dataclasses

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.ltx import local_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan
from diffpar.families.transformers.wan import _wan as wan_tp_plan

_TOKENS = split_input(split_dim=1, expected_dims=3)
_WAN_ROPE = split_input(split_dim=1, expected_dims=4, split_output=True)  # (1, tokens, 1, head_dim) cos and sin


def _with_stacks(model, stacks: tuple[str, ...]) -> TensorParallelPlan:
    """Wan's plan for `blocks`, repeated for the other block stacks of the same structure."""
    base = wan_tp_plan(model)

    def moved(key: str, stack: str) -> str:
        return stack + key[len("blocks"):]

    linears, attrs, norms = dict(base.linears), dict(base.attention_attrs), list(base.sharded_norms)
    for stack in stacks:
        if len(getattr(model, stack, ())) == 0:
            continue
        linears.update({moved(k, stack): v for k, v in base.linears.items() if k.startswith("blocks.")})
        attrs.update({moved(k, stack): v for k, v in base.attention_attrs.items() if k.startswith("blocks.")})
        norms += [moved(k, stack) for k in base.sharded_norms if k.startswith("blocks.")]
    return dataclasses.replace(base, linears=linears, attention_attrs=attrs, sharded_norms=tuple(norms))


# ------------------------------------------------------------------------------------------------------------
# Wan VACE: a control branch (`vace_blocks`) runs first on the control latents plus the video tokens; its hints
# are added after the matching main blocks. Both streams are split the same way where they enter `vace_blocks.0`,
# and the video tokens again where they enter `blocks.0` (forward passes its own, whole, variable to both).
# ------------------------------------------------------------------------------------------------------------


@register_cp_plan("WanVACETransformer3DModel")
def wan_vace_cp_plan(model) -> dict:
    return {
        "rope": {0: _WAN_ROPE, 1: _WAN_ROPE},
        "vace_blocks.0": {"hidden_states": _TOKENS, "control_hidden_states": _TOKENS},
        "blocks.0": {"hidden_states": _TOKENS},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("WanVACETransformer3DModel")
def wan_vace_tp_plan(model) -> TensorParallelPlan:
    plan = _with_stacks(model, ("vace_blocks",))
    # The control branch's input and hint projections (dim x dim each): columns split, outputs gathered whole.
    linears = dict(plan.linears)
    for i, block in enumerate(model.vace_blocks):
        for proj in ("proj_in", "proj_out"):
            if getattr(block, proj, None) is not None:
                linears[f"vace_blocks.{i}.{proj}"] = GATHER
    return dataclasses.replace(plan, linears=linears)


# ------------------------------------------------------------------------------------------------------------
# SkyReels-V2: Wan blocks whose attention processor passes the parallel config to the cross-attention too (it
# would attend over one copy of the prompt per rank: the same result, the degree times the work). Diffusion forcing
# gives every frame its own timestep: the (B, 6, tokens, dim) modulation is split with the tokens at every block,
# and the per-token output modulation is applied after the gather (at `norm_out`, a per-token LayerNorm).
# Refused: causal blocks (`num_frame_per_block > 1`, the asynchronous diffusion-forcing mode), whose
# (tokens x tokens) attention mask covers the whole video.
# ------------------------------------------------------------------------------------------------------------

_CAUSAL_REFUSAL = (
    "SkyReelsV2Transformer3DModel with num_frame_per_block={n} (causal_block_size, asynchronous diffusion forcing): "
    "its self-attention takes a (video tokens x video tokens) causal mask over the whole video, which diffpar does "
    "not split with the tokens. Use the synchronous mode (causal_block_size=None / ar_step=0), or run this model "
    "without ulysses_size / ring_size."
)


def _refuse_causal_blocks(module, args, kwargs):
    n = module.config.num_frame_per_block
    if n > 1:
        raise UnsupportedError(_CAUSAL_REFUSAL.format(n=n))


def prepare_skyreels_v2(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor

    local_attention_processors(model, ("blocks.*.attn2",), (SkyReelsV2AttnProcessor,), handle, name)
    hooks = []  # the pipeline may switch to causal blocks after enable (`_set_ar_attention`): checked per call
    handle.add(f"{name}: causal-block guard", lambda: [h.remove() for h in hooks])
    hooks.append(model.register_forward_pre_hook(_refuse_causal_blocks, with_kwargs=True))


@register_cp_plan("SkyReelsV2Transformer3DModel", prepare=prepare_skyreels_v2)
def skyreels_v2_cp_plan(model) -> dict:
    if model.config.num_frame_per_block > 1:
        raise UnsupportedError(_CAUSAL_REFUSAL.format(n=model.config.num_frame_per_block))
    return {
        "rope": {0: _WAN_ROPE, 1: _WAN_ROPE},
        "blocks.0": {"hidden_states": _TOKENS},
        # Diffusion forcing: (B, 6, tokens, dim); a (B, 6, dim) modulation is not 4-D and stays whole.
        "blocks.*": {"temb": split_input(split_dim=2, expected_dims=4)},
        "norm_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("SkyReelsV2Transformer3DModel")
def skyreels_v2_tp_plan(model) -> TensorParallelPlan:
    plan = wan_tp_plan(model)
    if getattr(model, "fps_projection", None) is None:
        return plan
    # The fps conditioning MLP (dim -> dim -> 6 dim, on one vector per sample): columns, then rows.
    linears = {**plan.linears, "fps_projection.net.0.proj": "colwise", "fps_projection.net.2": "rowwise"}
    return dataclasses.replace(plan, linears=linears)
