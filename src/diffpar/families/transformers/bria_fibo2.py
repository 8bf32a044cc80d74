"""Bria FIBO 2 (`BriaFibo2Transformer2DModel`): context- and tensor-parallel plans; diffusers ships neither.

Z-Image's blocks: a noise refiner over the image tokens (and the tokens of images to edit), a Perceiver that squeezes
the prompt into a few hundred gist tokens, then the main layers over [gist, image] (or [image, gist] with a gist
padding mask), some of which also cross-attend to one bundle of text-encoder features. The sequences are built in
the forward, so the plan splits where they enter a module stack, as for Z-Image:

- noise refiner: the image tokens are split entering its first block, its RoPE table and per-token noise mask at
  every block, and gathered after its last block (the forward then joins the image with the gist tokens);
- main layers: the same, gathered after the last layer (the forward then selects the image tokens by position);
- the Perceiver runs whole on every rank (it reads the whole prompt; its gist tokens are few), and every
  cross-attention to the text keeps the whole prompt as keys with this rank's queries: both attend locally.

One forward change, undone on detach: the Perceiver's and the cross-attentions' processors become
`BriaFibo2LocalAttnProcessor` (diffusers' processor with no parallel config, so no all-to-all over whole or
unsplit tensors). The main layers' gist padding mask (prompts of different lengths in one batch) covers the whole
sequence in order, which is what each rank attends over after Ulysses' all-to-all; the ring refuses a real one.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan


def _stack_plan(stack: str, blocks: int, per_block: dict) -> dict:
    """Split `x` entering block 0 and `per_block` inputs at every block; gather the last block's output."""
    if blocks == 0:
        return {}
    tokens = {"x": split_input(split_dim=1, expected_dims=3)}
    plan = first_and_every_block(stack, blocks, tokens, per_block)
    plan[f"{stack}.{blocks - 1}"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


def bria_fibo2_cp_plan(model) -> dict:
    per_block = {"freqs_cis": split_input(split_dim=1, expected_dims=3),  # (1, tokens, rotary pairs)
                 "noise_mask": split_input(split_dim=1, expected_dims=2)}  # None without images to edit
    return {**_stack_plan("noise_refiner", len(model.noise_refiner), per_block),
            **_stack_plan("layers", len(model.layers), per_block)}


def _local_processor_class():
    from diffusers.models.transformers.transformer_bria_fibo2 import BriaFibo2AttnProcessor

    class BriaFibo2LocalAttnProcessor(BriaFibo2AttnProcessor):
        """Attends on this rank alone: over whole tensors, or from a query shard to keys every rank holds whole."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
            config, self._parallel_config = self._parallel_config, None
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
            finally:
                self._parallel_config = config

    return BriaFibo2LocalAttnProcessor


def _local_attention_names(model) -> tuple[str, ...]:
    names = ["perceiver."]
    names += [f"layers.{i}.cross_attention" for i, block in enumerate(model.layers) if block.cross_attention is not None]
    return tuple(names)


def prepare_bria_fibo2(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_bria_fibo2 import BriaFibo2AttnProcessor

    replace_attention_processors(model, {BriaFibo2AttnProcessor: _local_processor_class()}, handle, name,
                                 type(model).__name__, within=_local_attention_names(model))


register_cp_plan("BriaFibo2Transformer2DModel", prepare=prepare_bria_fibo2)(bria_fibo2_cp_plan)

_ATTENTION = {"to_q": "colwise", "to_k": "colwise", "to_v": "colwise", "to_out.0": "rowwise"}
_SWIGLU = {"w1": "colwise", "w3": "colwise", "w2": "rowwise"}


def _entries(prefix: str, plan: dict) -> dict:
    return {f"{prefix}.{suffix}": style for suffix, style in plan.items()}


@register_tp_plan("BriaFibo2Transformer2DModel")
def _bria_fibo2(model) -> TensorParallelPlan:
    linears, attrs = {}, {}
    for stack in ("noise_refiner", "layers"):
        if len(getattr(model, stack)):
            linears.update(_entries(f"{stack}.*.attention", _ATTENTION))
            linears.update(_entries(f"{stack}.*.feed_forward", _SWIGLU))
            linears[f"{stack}.*.adaLN_modulation.0"] = GATHER
            attrs[f"{stack}.*.attention"] = ("heads",)
    for i, block in enumerate(model.layers):
        if block.cross_attention is not None:  # only the injection layers have one
            linears.update(_entries(f"layers.{i}.cross_attention", _ATTENTION))
            attrs[f"layers.{i}.cross_attention"] = ("heads",)
    if len(model.perceiver.layers):
        for attention in ("cross_attention", "self_attention"):
            linears.update(_entries(f"perceiver.layers.*.{attention}", _ATTENTION))
            attrs[f"perceiver.layers.*.{attention}"] = ("heads",)
        linears.update(_entries("perceiver.layers.*.ffn", _SWIGLU))
    linears["final_layer.adaLN_modulation.1"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
