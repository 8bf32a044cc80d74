"""Transformer tensor-parallel plans of our own, as data, and the choice of plan for a model.

`shard_plan_for(model, tp)` (called at planning time) returns the `ShardPlan` the engine carries out:
- the class's diffusers `_tp_plan` where the installed release ships one (0.40+: Flux, Flux2, QwenImage,
  QwenImage21), translated by `compat/diffusers_tp.py` into our styles, plus our modulation entries and the
  per-rank attention attributes of our plan for that class;
- else our plan: the same families for releases without `_tp_plan` (0.36-0.39), plus Wan and Z-Image, which no
  release plans.

A plan is built from the model (block sizes come from its config) and has three parts (`TensorParallelPlan`, the engine's `EvenSplitPlan`):

- `linears`: module-path glob (one `*` over a ModuleList) -> style. "colwise" shards output features (each rank
  computes whole heads / a slice of the MLP), "rowwise" shards input features and all-reduces the output (bias
  added once, after the sum). `Packed(kind, blocks)` shards a fused projection block by block, so that e.g. the
  q, k, v and MLP parts of one Linear are each split across ranks instead of the whole output row range.
- `attention_attrs`: attention-module glob -> attributes that count heads or head-sized widths. They are divided
  by tp on each rank, so processors that reshape with `attn.heads` (every release before 0.40, Wan, Z-Image) see
  the per-rank view.
- `sharded_norms`: RMSNorms taken over all heads at once (Wan's "rms_norm_across_heads"); on each rank they see
  only their heads, so the mean of squares is all-reduced.

"colwise_gather" is for AdaLN modulation projections (timestep embedding -> shift/scale/gate for the whole hidden
vector, e.g. 27% of FLUX.1-dev's weights): each rank computes a slice of the output features and one all-gather of
a (batch, k * dim) vector puts them together; their compute is negligible, the memory is not. diffusers' own plans
leave modulation replicated; diffpar adds these entries on top of them too.

Norms, embeddings and the output projection stay replicated: they act on the whole hidden vector, which every rank
holds between blocks.
"""
from __future__ import annotations

from typing import Callable

import torch

from diffpar.compat import diffusers_tp
from diffpar.engines.tp_shard import GATHER, EvenSplitPlan, Packed, ShardPlan, even_shard_plan
from diffpar.errors import UnsupportedError

# The name our plan functions return (one vocabulary with the engine's even splits).
TensorParallelPlan = EvenSplitPlan

# class name -> function(model) -> TensorParallelPlan
_TP_PLANS: dict[str, Callable[[torch.nn.Module], TensorParallelPlan]] = {}


def register_tp_plan(*class_names: str):
    def deco(fn):
        for name in class_names:
            _TP_PLANS[name] = fn
        return fn

    return deco


def diffpar_tp_plan_for(model: torch.nn.Module) -> TensorParallelPlan | None:
    for cls in type(model).__mro__:
        fn = _TP_PLANS.get(cls.__name__)
        if fn is not None:
            return fn(model)
    return None


def supported_tp_models() -> set[str]:
    return set(_TP_PLANS)


def _translated_native_plan(model: torch.nn.Module, native: dict) -> TensorParallelPlan:
    """diffusers' `_tp_plan` in our styles, plus what our plan for the class adds (modulation, head counts)."""
    linears = {}
    for pattern, (kind, blocks) in diffusers_tp.translate_tp_plan(model, native).items():
        linears[pattern] = Packed(kind, blocks) if blocks is not None else kind
    ours = diffpar_tp_plan_for(model)
    if ours is None:
        return TensorParallelPlan(linears=linears)
    linears.update({k: v for k, v in ours.linears.items() if v == GATHER and k not in linears})
    return TensorParallelPlan(linears=linears, attention_attrs=ours.attention_attrs, sharded_norms=ours.sharded_norms)


def shard_plan_for(model: torch.nn.Module, tp: int, world: int | None = None) -> ShardPlan:
    """The `ShardPlan` of `model` on `tp` ranks: diffusers' `_tp_plan` (translated) where the installed release
    has one, else ours. Local, no collective; raises UnsupportedError when neither exists or `tp` does not divide
    a head count or a split width (naming the largest tp that works, within `world` when given)."""
    native = diffusers_tp.native_tp_plan(model)
    if native:
        plan = _translated_native_plan(model, native)
        shards = even_shard_plan(model, plan, tp, source="diffusers _tp_plan", origin="diffusers", world=world)
        diffusers_tp.native_tp_prechecks(model, tp)  # after ours: our head-count message names what works
        return shards
    plan = diffpar_tp_plan_for(model)
    if plan is None:
        names = sorted(supported_tp_models())
        raise UnsupportedError(
            f"tp_size for {type(model).__name__}: neither the installed diffusers nor diffpar has a tensor-parallel "
            f"plan for it. Models with a plan: {names} (plus any class with diffusers' `_tp_plan` on "
            "diffusers>=0.40). Use ulysses_size / ring_size for this model instead."
        )
    return even_shard_plan(model, plan, tp, source="diffpar TP plan", origin="diffpar", world=world)


def _present(model: torch.nn.Module, plan: dict, container: str) -> dict:
    """Keep only entries whose module exists in the first block (optional projections, e.g. Wan's I2V add_k_proj)."""
    blocks = getattr(model, container, None)
    if blocks is None or len(blocks) == 0:
        return {}
    first = blocks[0]
    kept = {}
    for suffix, style in plan.items():
        obj = first
        for atom in suffix.split("."):
            obj = getattr(obj, atom, None)
            if obj is None:
                break
        if obj is not None:
            kept[f"{container}.*.{suffix}"] = style
    return kept


_ATTN_ATTRS = ("heads", "inner_dim", "inner_kv_dim", "kv_inner_dim")


# The joint (image + text stream) attention of MMDiT blocks: heads split by q/k/v columns, outputs by rows.
_JOINT_ATTENTION = {
    "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "attn.to_out.0": "rowwise",
    "attn.add_q_proj": "colwise", "attn.add_k_proj": "colwise", "attn.add_v_proj": "colwise",
    "attn.to_add_out": "rowwise",
}


@register_tp_plan("FluxTransformer2DModel")
def _flux(model) -> TensorParallelPlan:
    double = {
        **_JOINT_ATTENTION,
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
        "ff_context.net.0.proj": "colwise", "ff_context.net.2": "rowwise",
    }
    linears = _present(model, double, "transformer_blocks")
    if len(model.single_transformer_blocks):
        block = model.single_transformer_blocks[0]
        single = {
            "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "proj_mlp": "colwise",
            # proj_out reads cat([attention output, MLP hidden]): two column-sharded streams.
            "proj_out": Packed("rowwise", (model.inner_dim, block.mlp_hidden_dim)),
        }
        linears.update(_present(model, single, "single_transformer_blocks"))
    linears.update(flux_modulation(model))
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"transformer_blocks.*.attn": _ATTN_ATTRS, "single_transformer_blocks.*.attn": _ATTN_ATTRS},
    )


def flux_modulation(model) -> dict:
    gathered = _present(model, {"norm1.linear": GATHER, "norm1_context.linear": GATHER}, "transformer_blocks")
    gathered.update(_present(model, {"norm.linear": GATHER}, "single_transformer_blocks"))
    gathered["norm_out.linear"] = GATHER
    return gathered


def flux2_modulation(model) -> dict:
    return {name: GATHER for name in ("double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                                      "single_stream_modulation.linear", "norm_out.linear")}


def qwenimage_modulation(model) -> dict:
    gathered = _present(model, {"img_mod.1": GATHER, "txt_mod.1": GATHER}, "transformer_blocks")
    gathered["norm_out.linear"] = GATHER
    return gathered


@register_tp_plan("Flux2Transformer2DModel")
def _flux2(model) -> TensorParallelPlan:
    double = {
        **_JOINT_ATTENTION,
    }
    linears = _present(model, double, "transformer_blocks")
    if len(model.transformer_blocks):
        ff = model.transformer_blocks[0].ff
        half = ff.linear_in.out_features // 2  # SwiGLU: gate and value halves, each split across ranks
        for stream in ("ff", "ff_context"):
            linears[f"transformer_blocks.*.{stream}.linear_in"] = Packed("colwise", (half, half))
            linears[f"transformer_blocks.*.{stream}.linear_out"] = "rowwise"
    attrs = {"transformer_blocks.*.attn": _ATTN_ATTRS}
    if len(model.single_transformer_blocks):
        attn = model.single_transformer_blocks[0].attn
        inner, mlp = attn.inner_dim, attn.mlp_hidden_dim
        # q, k, v, then the MLP input, itself `mlp_mult_factor` parts (SwiGLU gate and value): each split alone.
        linears["single_transformer_blocks.*.attn.to_qkv_mlp_proj"] = Packed(
            "colwise", (inner, inner, inner) + (mlp,) * attn.mlp_mult_factor
        )
        linears["single_transformer_blocks.*.attn.to_out"] = Packed("rowwise", (inner, mlp))
        attrs["single_transformer_blocks.*.attn"] = _ATTN_ATTRS + ("mlp_hidden_dim",)
    linears.update(flux2_modulation(model))
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)


@register_tp_plan("QwenImageTransformer2DModel")
def _qwenimage(model) -> TensorParallelPlan:
    double = {
        **_JOINT_ATTENTION,
        "img_mlp.net.0.proj": "colwise", "img_mlp.net.2": "rowwise",
        "txt_mlp.net.0.proj": "colwise", "txt_mlp.net.2": "rowwise",
    }
    return TensorParallelPlan(
        linears={**_present(model, double, "transformer_blocks"), **qwenimage_modulation(model)},
        attention_attrs={"transformer_blocks.*.attn": _ATTN_ATTRS},
    )


@register_tp_plan("WanTransformer3DModel")
def _wan(model) -> TensorParallelPlan:
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise", "attn2.to_out.0": "rowwise",
        "attn2.add_k_proj": "colwise", "attn2.add_v_proj": "colwise",  # I2V image context only
        "ffn.net.0.proj": "colwise", "ffn.net.2": "rowwise",
    }
    norms = ["attn1.norm_q", "attn1.norm_k", "attn2.norm_q", "attn2.norm_k", "attn2.norm_added_k"]
    present_norms = tuple(_present(model, {n: None for n in norms}, "blocks"))
    linears = _present(model, block, "blocks")
    linears["condition_embedder.time_proj"] = GATHER  # the 6 modulation vectors of every block
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"blocks.*.attn1": _ATTN_ATTRS, "blocks.*.attn2": _ATTN_ATTRS},
        sharded_norms=present_norms,
    )


@register_tp_plan("ZImageTransformer2DModel")
def _zimage(model) -> TensorParallelPlan:
    block = {
        "attention.to_q": "colwise", "attention.to_k": "colwise", "attention.to_v": "colwise",
        "attention.to_out.0": "rowwise",
        # SwiGLU: w2(silu(w1 x) * w3 x)
        "feed_forward.w1": "colwise", "feed_forward.w3": "colwise",
        "feed_forward.w2": "rowwise",
    }
    linears, attrs = {}, {}
    # The refiners run on the image and caption streams before the main layers: same block type, same plan.
    block_with_modulation = {**block, "adaLN_modulation.0": GATHER}
    for container in ("noise_refiner", "context_refiner", "layers"):
        found = _present(model, block_with_modulation, container)
        if found:
            linears.update(found)
            attrs[f"{container}.*.attention"] = _ATTN_ATTRS
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
