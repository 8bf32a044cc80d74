"""Plans shared by the FLUX.1 derivatives (LongCat-Image, Ovis-Image, Bria, Bria FIBO): the same double-stream and
single-stream blocks (attention projections, AdaLN-Zero modulation, `proj_mlp` / `proj_out`), some with gated
(SwiGLU) feed-forwards. No registration here: each family file registers its class with these builders.

Context parallel: FLUX.1's split (what diffusers ships as Flux's `_cp_plan`): the image and text tokens and their
position ids are split as they enter the model, so each rank holds [its text shard, its image shard] and the RoPE
table computed from exactly those ids; attention goes through diffusers' dispatcher in these processors, and every
block works token by token outside attention; the output is gathered after `proj_out`.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import Packed
from diffpar.families.transformers.flux import flux_modulation
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    JOINT_ATTENTION,
    TensorParallelPlan,
    present,
)


def flux_token_split_plan(extra_inputs: dict | None = None) -> dict:
    """Split the image/text tokens and position ids where they enter the model; gather after `proj_out`."""
    tokens = split_input(split_dim=1, expected_dims=3)
    ids = split_input(split_dim=0, expected_dims=2)
    return {
        "": {"hidden_states": tokens, "encoder_hidden_states": tokens, "img_ids": ids, "txt_ids": ids,
             **(extra_inputs or {})},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


def _feed_forward_in(linear, out_linear):
    """A feed-forward's input projection: plain colwise, or for a gated one (twice as wide as the output
    projection reads) its value and gate halves split separately."""
    half = out_linear.in_features
    return Packed("colwise", (half, half)) if linear.out_features == 2 * half else "colwise"


def flux_like_tp_plan(model) -> TensorParallelPlan:
    """FLUX.1's tensor-parallel plan, with gated feed-forwards and gated single-block MLPs packed by halves."""
    linears = {}
    attrs = {"transformer_blocks.*.attn": ATTN_ATTRS, "single_transformer_blocks.*.attn": ATTN_ATTRS}
    if len(model.transformer_blocks):
        block = model.transformer_blocks[0]
        double = dict(JOINT_ATTENTION)
        for stream in ("ff", "ff_context"):
            ff = getattr(block, stream, None)
            if ff is not None:
                double[f"{stream}.net.0.proj"] = _feed_forward_in(ff.net[0].proj, ff.net[2])
                double[f"{stream}.net.2"] = "rowwise"
        linears.update(present(model, double, "transformer_blocks"))
    if len(model.single_transformer_blocks):
        block = model.single_transformer_blocks[0]
        mlp = block.mlp_hidden_dim
        inner = block.proj_out.in_features - mlp
        gated = block.proj_mlp.out_features == 2 * mlp
        single = {
            "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise",
            "proj_mlp": Packed("colwise", (mlp, mlp)) if gated else "colwise",
            # proj_out reads cat([attention output, MLP hidden]): two column-sharded streams.
            "proj_out": Packed("rowwise", (inner, mlp)),
        }
        linears.update(present(model, single, "single_transformer_blocks"))
        if gated:  # the block splits proj_mlp's output by its own mlp_hidden_dim: the per-rank width
            attrs["single_transformer_blocks.*"] = ("mlp_hidden_dim",)
    linears.update(flux_modulation(model))
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
