"""Context- and tensor-parallel plans for Ideogram 4 (`Ideogram4Transformer2DModel`); diffusers ships neither.

The forward works on one packed sequence ([left padding][text][image] per row, as the pipeline lays it out) with a
per-token MRoPE table and a query-by-key mask from `segment_ids` (tokens attend within their segment: the padding
is a segment of its own).

Plan: the sequence is split as it enters the first layer, the RoPE table (cos, sin) as it leaves `rotary_emb`;
the output is gathered after `final_layer` (per token). Each rank holds one contiguous piece, so after Ulysses'
all-to-all every rank has every query and key of its heads in the original order: the whole (L x L) segment mask
applies as it is (diffpar's Ulysses mask shim passes a whole-length mask through). Ring attention cannot apply a
query-by-key mask; a mask that masks nothing is dropped by `Ideogram4ContextParallelAttnProcessor` (exact), and a
real one under the ring is refused by diffpar's ring shim (use ulysses_size for padded prompts).
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import blocks_split_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, present, register_tp_plan


def _processor_class():
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4AttnProcessor

    class Ideogram4ContextParallelAttnProcessor(Ideogram4AttnProcessor):
        def __call__(self, attn, hidden_states, attention_mask, image_rotary_emb):
            if attention_mask is not None and self._parallel_config is not None and bool(attention_mask.all()):
                attention_mask = None
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)

    return Ideogram4ContextParallelAttnProcessor


def prepare_ideogram4(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_ideogram4 import Ideogram4AttnProcessor

    replace_attention_processors(model, {Ideogram4AttnProcessor: _processor_class()}, handle, name,
                                 type(model).__name__)


@register_cp_plan("Ideogram4Transformer2DModel", prepare=prepare_ideogram4)
def ideogram4_cp_plan(model) -> dict:
    rope = split_input(split_dim=1, expected_dims=3, split_output=True)
    return blocks_split_plan(model, "layers", gather_after="final_layer", what="layers",
                             tables={"rotary_emb": {0: rope, 1: rope}})


@register_tp_plan("Ideogram4Transformer2DModel")
def ideogram4_tp_plan(model) -> TensorParallelPlan:
    block = {
        "attention.to_q": "colwise", "attention.to_k": "colwise", "attention.to_v": "colwise",
        "attention.to_out.0": "rowwise",
        "feed_forward.w1": "colwise", "feed_forward.w3": "colwise", "feed_forward.w2": "rowwise",
        "adaln_modulation": GATHER,
    }
    linears = present(model, block, "layers")
    # The text-feature projection (53248 stacked encoder features -> hidden: 4% of the real model): sliced by
    # output features and gathered.
    linears["llm_cond_proj"] = GATHER
    linears["final_layer.adaln_modulation"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs={"layers.*.attention": ("num_heads",)})
