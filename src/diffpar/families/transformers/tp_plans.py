"""Transformer tensor-parallel plans: the registry our family files fill, shared pieces, and the choice of plan.

`shard_plan_for(model, tp)` (called at planning time) returns the `ShardPlan` the engine carries out:
- the class's diffusers `_tp_plan` where the installed release ships one (0.40+: Flux, Flux2, QwenImage,
  QwenImage21), translated by `compat/diffusers_tp.py` into our styles, plus our modulation entries and the
  per-rank attention attributes of our plan for that class;
- else our plan (one file per family: flux.py, flux2.py, qwenimage.py, wan.py, zimage.py): the same families for
  releases without `_tp_plan` (0.36-0.39), plus Wan and Z-Image, which no release plans.

A plan is built from the model (block sizes come from its config) and has three parts (`TensorParallelPlan`, the engine's `EvenSplitPlan`):

- `linears`: module-path glob (one `*` over a ModuleList) -> style. "colwise" shards output features (each rank
  computes whole heads / a slice of the MLP), "rowwise" shards input features and all-reduces the output (bias
  added once, after the sum). `Packed(kind, blocks)` shards a fused projection block by block, so that e.g. the
  q, k, v and MLP parts of one Linear are each split across ranks instead of the whole output row range.
- `attention_attrs`: attention-module glob -> attributes that count heads or head-sized widths. They are divided
  by tp on each rank, so processors that reshape with `attn.heads` (every release before 0.40, Wan, Z-Image) see
  the per-rank view.
- `sharded_norms`: norms taken over all heads at once (Wan's "rms_norm_across_heads" RMSNorm, Lumina-Next's
  "layer_norm_across_heads" LayerNorm); on each rank they see only their heads, so the statistics are all-reduced
  (the mean of squares; for a LayerNorm the sum and the sum of squares, in one all-reduce).
- per-head parameters (`EvenSplitPlan.head_parameters`, Lumina-Next's cross-attention gate): one entry per head,
  each rank keeping its heads' entries, no reduction.

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
from diffpar.families.registry import ClassRegistry

# The name our plan functions return (one vocabulary with the engine's even splits).
TensorParallelPlan = EvenSplitPlan

# class name -> function(model) -> TensorParallelPlan; one file per family registers its plan.
TP_PLANS: ClassRegistry[Callable[[torch.nn.Module], TensorParallelPlan]] = ClassRegistry("tensor-parallel plan")


def register_tp_plan(*class_names: str):
    def deco(fn):
        TP_PLANS.register(class_names, fn)
        return fn

    return deco


def diffpar_tp_plan_for(model: torch.nn.Module) -> TensorParallelPlan | None:
    build = TP_PLANS.lookup(model)
    return build(model) if build is not None else None


def supported_tp_models() -> set[str]:
    return set(TP_PLANS.names())


def _translated_native_plan(model: torch.nn.Module, native: dict) -> TensorParallelPlan:
    """diffusers' `_tp_plan` in our styles, plus what our plan for the class adds (modulation, head counts)."""
    linears = {}
    for pattern, (kind, blocks) in diffusers_tp.translate_tp_plan(model, native).items():
        linears[pattern] = Packed(kind, blocks) if blocks is not None else kind
    ours = diffpar_tp_plan_for(model)
    if ours is None:
        return TensorParallelPlan(linears=linears)
    linears.update({k: v for k, v in ours.linears.items() if v == GATHER and k not in linears})
    return TensorParallelPlan(linears=linears, attention_attrs=ours.attention_attrs, sharded_norms=ours.sharded_norms,
                              sliced_outputs=ours.sliced_outputs, reduced_parameters=ours.reduced_parameters)


def shard_plan_for(model: torch.nn.Module, tp: int, world: int | None = None) -> ShardPlan:
    """The `ShardPlan` of `model` on `tp` ranks: diffusers' `_tp_plan` (translated) where the installed release
    has one, else ours. Local, no collective; raises UnsupportedError when neither exists or `tp` does not divide
    an attention has fewer heads than ranks (naming the largest tp that works, within `world` when given);
    uneven head counts and widths are split by whole heads (a rank may hold one head more)."""
    native = diffusers_tp.native_tp_plan(model)
    if native:
        plan = _translated_native_plan(model, native)
        shards = even_shard_plan(model, plan, tp, source="diffusers _tp_plan", origin="diffusers", world=world)
        # After ours: our head-count message names what works. diffusers' degree checks refuse any tp that does not
        # divide a head count or a width, which diffpar's uneven split (whole heads) carries out itself: then only
        # its checks of the model's state run.
        diffusers_tp.native_tp_prechecks(model, tp, degree_checks=not shards.uneven())
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


def present(model: torch.nn.Module, plan: dict, container: str) -> dict:
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


ATTN_ATTRS = ("heads", "inner_dim", "inner_kv_dim", "kv_inner_dim")


# The joint (image + text stream) attention of MMDiT blocks: heads split by q/k/v columns, outputs by rows.
JOINT_ATTENTION = {
    "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "attn.to_out.0": "rowwise",
    "attn.add_q_proj": "colwise", "attn.add_k_proj": "colwise", "attn.add_v_proj": "colwise",
    "attn.to_add_out": "rowwise",
}

# Both streams' feed-forwards of a dual-stream (MMDiT) block: the hidden width split by columns, back by rows.
DUAL_STREAM_FF = {
    "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
    "ff_context.net.0.proj": "colwise", "ff_context.net.2": "rowwise",
}

# Both streams' AdaLN modulation (a few vectors of the hidden width per stream and block): gathered.
DUAL_STREAM_MODULATION = {"norm1.linear": GATHER, "norm1_context.linear": GATHER}

# A whole dual-stream block: joint attention, both feed-forwards, both modulations.
DUAL_STREAM_BLOCK = {**JOINT_ATTENTION, **DUAL_STREAM_FF, **DUAL_STREAM_MODULATION}
