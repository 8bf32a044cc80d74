"""Lumina-Image 2.0 (`Lumina2Transformer2DModel`): context- and tensor-parallel plans; diffusers ships neither.

The forward runs three stacks: a noise refiner on the image tokens, a context refiner on the prompt (with its
padding mask), then the main layers on one joint sequence per sample, [real prompt tokens, image tokens, padding],
built by indexing in the forward (not a module).

CP plan:
- the image tokens are split as they leave `x_embedder`, the image RoPE table at every noise-refiner block (it
  leaves `rope_embedder` in a tuple with lists, which diffusers' hooks cannot split); the noise refiner works on
  shards and its last block's output is gathered, because the forward then places the image tokens after each
  sample's prompt;
- the context refiner runs whole on every rank, with the original processor: a few prompt tokens, and the prompt's
  padding mask then applies locally (a ring could not apply it);
- the joint sequence is split entering `layers.0`, the joint RoPE table at every layer;
  a padding mask (only for batches whose prompts differ in length) stays whole: after Ulysses' all-to-all each
  rank attends over the whole sequence in order (the ring cannot take one: a clear error);
- gathered after `norm_out` (the output then cuts each sample's image tokens).
Attention in the noise refiner and the main layers gets `ContextParallelLumina2AttnProcessor` (put back on detach).

TP plan: attention by heads (query and key/value heads), the SwiGLU feed-forward by width, each block's
modulation (`norm1.linear`) gathered, in all three stacks.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.attention_processors import prepare_generic_attention
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan

_SPLIT_STACKS = ("noise_refiner.", "layers.")


def prepare_lumina2(model, config, handle, name: str) -> None:
    prepare_generic_attention(model, config, handle, name, within=_SPLIT_STACKS)


@register_cp_plan("Lumina2Transformer2DModel", prepare=prepare_lumina2)
def lumina2_cp_plan(model) -> dict:
    tokens = split_input(split_dim=1, expected_dims=3)
    # `rope_embedder` returns lists besides the tables (diffusers' hooks split tensors only), so each stack's
    # table is split where every block receives it.
    rope = {"image_rotary_emb": split_input(split_dim=1, expected_dims=3)}
    plan = {}
    refiners = len(model.noise_refiner)
    if refiners:
        plan["x_embedder"] = {0: split_input(split_dim=1, expected_dims=3, split_output=True)}
        plan["noise_refiner.*"] = rope
        plan[f"noise_refiner.{refiners - 1}"] = gather_output(gather_dim=1, expected_dims=3)
    plan.update(first_and_every_block("layers", len(model.layers), {"hidden_states": tokens}, rope))
    plan["norm_out"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


@register_tp_plan("Lumina2Transformer2DModel")
def lumina2_tp_plan(model) -> TensorParallelPlan:
    block = {
        "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "attn.to_out.0": "rowwise",
        "feed_forward.linear_1": "colwise", "feed_forward.linear_3": "colwise", "feed_forward.linear_2": "rowwise",
        "norm1.linear": GATHER,
    }
    linears, attrs = {}, {}
    for stack in ("noise_refiner", "context_refiner", "layers"):
        found = present(model, block, stack)
        if found:
            linears.update(found)
            attrs[f"{stack}.*.attn"] = ATTN_ATTRS
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
