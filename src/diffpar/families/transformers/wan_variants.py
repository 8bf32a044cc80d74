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
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan
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


# ------------------------------------------------------------------------------------------------------------
# Wan Animate: Wan blocks, and after every few blocks a face adapter, a cross-attention from each video frame's
# tokens to that frame's motion vectors (the face encoder's output: (B, frames, N, dim), computed whole on every
# rank). diffusers' processor cuts the query tokens into `frames` equal groups, which holds for the whole sequence
# only. While parallel, each face adapter gets `_frame_aligned_class(...)`: this rank's tokens are placed in the
# whole sequence (their global positions are the split of arange(tokens), cut as the hooks cut the video), and
# each frame they touch attends to its own motion vectors, locally, with diffusers' processor. The video's token
# grid comes from a pre-hook on the model (undone on detach).
# ------------------------------------------------------------------------------------------------------------

_FRAME_ALIGNED: dict[type, type] = {}


def _frame_aligned_class(base: type) -> type:
    if base in _FRAME_ALIGNED:
        return _FRAME_ALIGNED[base]

    def _get(self):
        return None

    def _set(self, value):
        self.__dict__["_split_config"] = value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        import torch

        from diffpar.compat.diffusers_cp_hooks import shard

        config = self.__dict__.get("_split_config")
        grid = self.__dict__.get("_grid", {})
        if config is None or "tokens" not in grid:
            return base.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask)
        if attention_mask is not None:
            raise UnsupportedError(
                "WanAnimateTransformer3DModel: a face-adapter attention mask under context parallelism (it covers "
                "the whole video); diffpar supports the model's own calls, which pass none."
            )
        frames = encoder_hidden_states.shape[1]
        per_frame = grid["tokens"] // frames
        positions = shard(torch.arange(grid["tokens"], device=hidden_states.device), 0,
                          config.context_parallel_config)
        frame_of = positions // per_frame
        outputs, start = [], 0
        for frame in range(int(frame_of[0]), int(frame_of[-1]) + 1) if len(positions) else ():
            count = int((frame_of == frame).sum())
            outputs.append(base.__call__(self, attn, hidden_states[:, start:start + count],
                                         encoder_hidden_states[:, frame:frame + 1], None))
            start += count
        return torch.cat(outputs, dim=1) if outputs else hidden_states[:, :0]  # a rank without tokens

    cls = type(f"FrameAligned{base.__name__}", (base,), {
        "__doc__": f"{base.__name__} on a shard of the video: each frame's tokens attend to that frame's motion.",
        "_parallel_config": property(_get, _set),
        "__call__": __call__,
    })
    _FRAME_ALIGNED[base] = cls
    return cls


def _video_grid_hook(grid: dict):
    def record(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        p_t, p_h, p_w = module.config.patch_size
        _, _, frames, height, width = hidden.shape
        grid["tokens"] = (frames // p_t) * (height // p_h) * (width // p_w)

    return record


def prepare_wan_animate(model, config, handle, name: str) -> None:
    import copy

    from diffusers.models.transformers import transformer_wan_animate as animate

    local_attention_processors(model, ("blocks.*.attn2",), (animate.WanAttnProcessor,), handle, name)
    grid: dict = {}
    targets = []
    handle.add(f"{name}: frame-aligned face adapters", lambda: [setattr(m, "processor", p) for m, p in targets])
    for module in model.face_adapter:
        if type(module.processor) is not animate.WanAnimateFaceBlockAttnProcessor:
            raise UnsupportedError(
                f"{type(model).__name__}: a face adapter has a {type(module.processor).__name__}, which has no "
                "context-parallel version in diffpar. Remove what installed it before enable_cache.")
        targets.append((module, module.processor))
    for module, old in targets:
        new = copy.copy(old)
        new.__class__ = _frame_aligned_class(type(old))
        new.__dict__["_grid"] = grid
        module.processor = new
    hooks = []
    handle.add(f"{name}: video grid hook", lambda: [h.remove() for h in hooks])
    hooks.append(model.register_forward_pre_hook(_video_grid_hook(grid), with_kwargs=True))


@register_cp_plan("WanAnimateTransformer3DModel", prepare=prepare_wan_animate)
def wan_animate_cp_plan(model) -> dict:
    return {
        "rope": {0: _WAN_ROPE, 1: _WAN_ROPE},
        "blocks.0": {"hidden_states": _TOKENS},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("WanAnimateTransformer3DModel")
def wan_animate_tp_plan(model) -> TensorParallelPlan:
    plan = wan_tp_plan(model)
    # Face adapters: heads split by q/k/v columns, the output by rows (their q/k norms are per head).
    linears = dict(plan.linears)
    attrs = dict(plan.attention_attrs)
    if len(model.face_adapter):
        linears.update({"face_adapter.*.to_q": "colwise", "face_adapter.*.to_k": "colwise",
                        "face_adapter.*.to_v": "colwise", "face_adapter.*.to_out": "rowwise"})
        attrs["face_adapter.*"] = ATTN_ATTRS
    return dataclasses.replace(plan, linears=linears, attention_attrs=attrs)


# ------------------------------------------------------------------------------------------------------------
# Wan Animate 2: refused for context parallelism (tensor parallelism works). Its self-attention applies RoPE inside
# the processor by each token's position in the whole sequence (from the patch grid), and its generation pass
# attends through a flex `BlockMask` over a packed [generation | reference] buffer of the whole video, on the flex
# backend, which has no context-parallel path in diffusers.
# ------------------------------------------------------------------------------------------------------------

WAN_ANIMATE_2_REFUSAL = (
    "cannot be split along the sequence: its self-attention applies RoPE inside the processor by each token's "
    "position in the whole sequence, and its generation pass attends through a flex BlockMask built over the whole "
    "packed [generation | reference] video on the flex backend, which has no context-parallel path in diffusers"
)


@register_cp_plan("WanAnimate2Transformer3DModel")
def wan_animate_2_cp_plan(model) -> dict:
    raise UnsupportedError(
        f"{type(model).__name__} {WAN_ANIMATE_2_REFUSAL}. Use tp_size (tensor parallelism: attention heads and the "
        "MLP split over the ranks) for this model instead of ulysses_size / ring_size."
    )


@register_tp_plan("WanAnimate2Transformer3DModel")
def wan_animate_2_tp_plan(model) -> TensorParallelPlan:
    attn = {"to_q": "colwise", "to_k": "colwise", "to_v": "colwise", "to_out.0": "rowwise"}
    block = {f"{a}.{k}": v for a in ("self_attn", "cross_attn") for k, v in attn.items()}
    block.update({"cross_attn.add_k_proj": "colwise", "cross_attn.add_v_proj": "colwise",  # image context
                  "ffn.0": "colwise", "ffn.2": "rowwise"})
    norms = {n: None for n in ("self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k",
                               "cross_attn.norm_added_k")}  # RMSNorms across heads
    linears = present(model, block, "blocks")
    linears["time_projection.1"] = GATHER  # the 6 modulation vectors of every block
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"blocks.*.self_attn": ATTN_ATTRS, "blocks.*.cross_attn": ATTN_ATTRS},
        sharded_norms=tuple(present(model, norms, "blocks")),
    )
