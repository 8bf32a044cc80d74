"""Context- and tensor-parallel plans for PRX (`PRXTransformer2DModel`); diffusers ships neither.

Attention: image queries attend to [text keys, image keys] (the prompt, unchanged through the blocks, has keys
and values only). Plan: the image tokens are split as they enter the first block, the RoPE table (image tokens,
dim 2) as it leaves `pe_embedder`; at every block the prompt is split the same way (dim 1), so each rank projects
its own text shard; gather after `final_layer`. Forward change (undone on detach):
`PRXContextParallelAttnProcessor` looks at the whole (batch, text) mask: one that masks nothing is dropped (the
ring takes none); a real one is cut like the prompt, the processor builds this rank's key mask [text shard,
image shard: all real], and diffpar's Ulysses mask shim gathers it in key order (under the ring, diffpar's ring
shim refuses it). The decision is taken on the whole mask, so every rank takes the same branch.

Tensor parallel: the fused image q/k/v and text k/v projections packed by heads, outputs by rows, the GELU-gated
MLP by its hidden width, modulation gathered.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, shard, split_input
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


def _processor_class():
    from diffusers.models.transformers.transformer_prx import PRXAttnProcessor2_0

    class PRXContextParallelAttnProcessor(PRXAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, **kwargs):
            if attention_mask is not None and self._parallel_config is not None:
                # Whole (batch, text) mask: decided on the whole prompt, so every rank takes the same branch.
                if bool(attention_mask.bool().all()):
                    attention_mask = None
                else:
                    attention_mask = shard(attention_mask, 1, self._parallel_config.context_parallel_config)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    **kwargs)

    return PRXContextParallelAttnProcessor


def prepare_prx(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_prx import PRXAttnProcessor2_0

    replace_attention_processors(model, {PRXAttnProcessor2_0: _processor_class()}, handle, name, type(model).__name__)


@register_cp_plan("PRXTransformer2DModel", prepare=prepare_prx)
def prx_cp_plan(model) -> dict:
    blocks = len(model.blocks)
    if blocks == 0:
        raise UnsupportedError(f"{type(model).__name__} has no blocks to parallelize.")
    first = {"hidden_states": split_input(split_dim=1, expected_dims=3)}
    every = {"encoder_hidden_states": split_input(split_dim=1, expected_dims=3)}
    plan = first_and_every_block("blocks", blocks, first, every)
    plan["pe_embedder"] = {0: split_input(split_dim=2, expected_dims=6, split_output=True)}
    plan["final_layer"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


@register_tp_plan("PRXTransformer2DModel")
def prx_tp_plan(model) -> TensorParallelPlan:
    if not len(model.blocks):
        return TensorParallelPlan(linears={})
    inner = model.blocks[0].attention.inner_dim
    block = {
        "attention.img_qkv_proj": Packed("colwise", (inner, inner, inner)),
        "attention.txt_kv_proj": Packed("colwise", (inner, inner)),
        "attention.to_out.0": "rowwise",
        "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise",
        "modulation.lin": GATHER,
    }
    linears = present(model, block, "blocks")
    linears["final_layer.adaLN_modulation.1"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs={"blocks.*.attention": ATTN_ATTRS})
