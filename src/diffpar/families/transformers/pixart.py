"""PixArt-Alpha / Sigma (`PixArtTransformer2DModel`): context- and tensor-parallel plans; diffusers ships neither.

CP plan: the image tokens are split as they leave `pos_embed` (the 2-D sin-cos positional embedding is added
inside it, per token, on the whole latent, so splitting its output is exact); every block works on its shard;
gather after `proj_out` (the unpatchify that follows needs every token). The prompt is not split: each block's
cross-attention (`attn2`) attends from the image shard to the whole prompt locally, and the prompt mask
(`encoder_attention_mask`) covers exactly those keys. Self-attention (`attn1`) goes through diffusers' dispatcher
(`ContextParallelAttnProcessor2_0`, swapped in while parallel, the original objects put back on detach).

TP plan: each block's self- and cross-attention by heads, its MLP by width; the AdaLN-single modulation
(`adaln_single.linear`, 6 x dim) gathered. Caption projection, patch embedding and output stay whole.
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
}


@register_cp_plan("PixArtTransformer2DModel", prepare=prepare_generic_attention)
def pixart_cp_plan(model) -> dict:
    check_generic_attention(model, type(model).__name__)
    return {
        "pos_embed": {0: split_input(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("PixArtTransformer2DModel")
def pixart_tp_plan(model) -> TensorParallelPlan:
    linears = present(model, _BLOCK, "transformer_blocks")
    linears["adaln_single.linear"] = GATHER
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"transformer_blocks.*.attn1": ATTN_ATTRS, "transformer_blocks.*.attn2": ATTN_ATTRS},
    )
