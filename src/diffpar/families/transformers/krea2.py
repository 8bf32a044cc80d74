"""Context- and tensor-parallel plans for Krea 2 (`Krea2Transformer2DModel`); diffusers ships neither.

The forward runs a small text-fusion transformer on the whole prompt, then joins [text, image] into one sequence
for the blocks, with one RoPE table over that sequence and, for padded prompts, one key mask over it.

Plan: the joined sequence is split as it enters the first block, the RoPE table (cos, sin) as it leaves
`rotary_emb` (the same positions); the sequence is gathered after the last block (the forward then drops the
text tokens by count, which needs the whole sequence). Each rank holds one contiguous piece of the joined
sequence, so after Ulysses' all-to-all the keys are in their original order and the whole mask is the right one.

Forward changes, undone on detach: the text-fusion attentions (before the split, on the whole prompt on every rank)
get `Krea2LocalAttnProcessor`, whose parallel config is always None (they must not exchange anything); the
blocks' attentions get `Krea2ContextParallelAttnProcessor`, which drops a mask that masks nothing (the ring takes
none; a real one under the ring is refused by diffpar's ring shim).
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import blocks_split_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, present, register_tp_plan

KREA2_ATTN_ATTRS = ("num_heads", "num_kv_heads", "hidden_size")


def _processor_classes():
    from diffusers.models.transformers.transformer_krea2 import Krea2AttnProcessor

    class Krea2LocalAttnProcessor(Krea2AttnProcessor):
        """Attention over what this rank holds whole: never context-parallel, whatever is assigned."""

        @property
        def _parallel_config(self):
            return None

        @_parallel_config.setter
        def _parallel_config(self, value):
            pass

    class Krea2ContextParallelAttnProcessor(Krea2AttnProcessor):
        def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
            if attention_mask is not None and self._parallel_config is not None and bool(attention_mask.all()):
                attention_mask = None
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)

    return Krea2LocalAttnProcessor, Krea2ContextParallelAttnProcessor


def prepare_krea2(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_krea2 import Krea2AttnProcessor

    local, parallel = _processor_classes()
    label = type(model).__name__
    replace_attention_processors(model, {Krea2AttnProcessor: local}, handle, name, label, within=("text_fusion",))
    replace_attention_processors(model, {Krea2AttnProcessor: parallel}, handle, name, label,
                                 within=("transformer_blocks",))


@register_cp_plan("Krea2Transformer2DModel", prepare=prepare_krea2)
def krea2_cp_plan(model) -> dict:
    rope = split_input(split_dim=0, expected_dims=2, split_output=True)
    return blocks_split_plan(model, tables={"rotary_emb": {0: rope, 1: rope}})


@register_tp_plan("Krea2Transformer2DModel")
def krea2_tp_plan(model) -> TensorParallelPlan:
    block = {
        # Heads by columns (GQA: k and v by their own heads); the output gate is per head channel.
        "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "attn.to_gate": "colwise",
        "attn.to_out.0": "rowwise",
        "ff.gate": "colwise", "ff.up": "colwise", "ff.down": "rowwise",
    }
    linears, attrs = {}, {}
    # The blocks, and the text-fusion blocks (the same attention and MLP, on the prompt).
    for prefix, owner, container in (("", model, "transformer_blocks"),
                                     ("text_fusion.", model.text_fusion, "layerwise_blocks"),
                                     ("text_fusion.", model.text_fusion, "refiner_blocks")):
        found = present(owner, block, container)
        if found:
            linears.update({prefix + key: style for key, style in found.items()})
            attrs[f"{prefix}{container}.*.attn"] = KREA2_ATTN_ATTRS
    linears["time_mod_proj"] = GATHER  # the shared modulation of every block
    linears["txt_in.linear_1"] = "colwise"
    linears["txt_in.linear_2"] = "rowwise"
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
