"""Hunyuan-DiT (`HunyuanDiT2DModel`): context- and tensor-parallel plans; diffusers ships neither.

CP plan: the image tokens are split as they leave `pos_embed` (a patch projection: no positional embedding is
added there) and the model's RoPE input (`image_rotary_emb`, a (cos, sin) pair over the image tokens) with them;
blocks work on shards, their long skip connections too; gather after `proj_out`. Self-attention (`attn1`) goes
through diffusers' dispatcher (`ContextParallelHunyuanAttnProcessor`); cross-attention (`attn2`) rotates the
shard's queries with the shard's RoPE and attends to the whole prompt locally (padded prompt tokens are replaced
by learned embeddings in the forward, so no mask reaches attention).

TP plan: self- and cross-attention by heads, the MLP by width, each block's AdaLN shift (`norm1.linear`) and long
skip projection (`skip_linear`) gathered, the T5 text projection and the conditioning MLP split by width, the
timestep embedding and output modulation gathered.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import check_generic_attention, prepare_generic_attention
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan

_BLOCK = {
    "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
    "attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise", "attn2.to_out.0": "rowwise",
    "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
    "norm1.linear": GATHER,
}


@register_cp_plan("HunyuanDiT2DModel", prepare=prepare_generic_attention)
def hunyuan_dit_cp_plan(model) -> dict:
    check_generic_attention(model, type(model).__name__)
    rope_half = split_input(split_dim=0, expected_dims=2)
    return {
        "": {"image_rotary_emb": [rope_half, rope_half]},
        "pos_embed": {0: split_input(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("HunyuanDiT2DModel")
def hunyuan_dit_tp_plan(model) -> TensorParallelPlan:
    linears = present(model, _BLOCK, "blocks")
    # Only the second half of the blocks has a skip projection: list those that do.
    for i, block in enumerate(model.blocks):
        if block.skip_linear is not None:
            linears[f"blocks.{i}.skip_linear"] = GATHER
    # Two-layer MLPs (elementwise activation between): the first by output width, the second by input width.
    for mlp in ("text_embedder", "time_extra_emb.extra_embedder"):
        linears[f"{mlp}.linear_1"] = "colwise"
        linears[f"{mlp}.linear_2"] = "rowwise"
    linears["time_extra_emb.timestep_embedder.linear_2"] = GATHER
    linears["norm_out.linear"] = GATHER
    return TensorParallelPlan(
        linears=linears, attention_attrs={"blocks.*.attn1": ATTN_ATTRS, "blocks.*.attn2": ATTN_ATTRS},
    )
