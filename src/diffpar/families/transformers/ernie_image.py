"""Context- and tensor-parallel plans for ERNIE-Image (`ErnieImageTransformer2DModel`); diffusers ships neither.

The forward joins image and text tokens into one sequence, sequence-first ([S, B, H]), before the first layer,
and passes every layer the RoPE table ([B, S, 1, D]), six modulation tensors expanded along the sequence
([S, B, H] each) and a key-padding mask over the whole sequence.

Plan: the joined sequence is split as it enters the first layer (dim 0); at every layer the RoPE table (dim 1) and
the six modulation tensors (dim 0) are split the same way; the sequence is gathered after the last layer (the
output layer then keeps the first image tokens of the whole sequence, which only the whole sequence has).
Each rank holds one contiguous piece of the joined sequence, so after Ulysses' all-to-all the keys are the whole
sequence in its original order: the whole mask is the right one. Forward change (undone on detach):
`ErnieImageContextParallelAttnProcessor` drops a mask that masks nothing (the prompts of a batch are all as long
as the longest; the ring takes no mask) and, where the release cannot mask across ranks, refuses a real one.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks
from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


def _processor_class():
    from diffusers.models.transformers.transformer_ernie_image import ErnieImageSingleStreamAttnProcessor

    class ErnieImageContextParallelAttnProcessor(ErnieImageSingleStreamAttnProcessor):
        def __call__(self, attn, hidden_states, attention_mask=None, freqs_cis=None):
            if attention_mask is not None and self._parallel_config is not None:
                if bool(attention_mask.all()):
                    attention_mask = None
                elif not context_parallel_attention_takes_masks():
                    raise UnsupportedError(
                        "ERNIE-Image: the prompts in this batch differ in length (text_lens), which needs a padding "
                        "mask, and this diffusers release's context-parallel attention takes none (0.37+ does). "
                        "Run prompts of different lengths in separate calls, or upgrade diffusers."
                    )
            return super().__call__(attn, hidden_states, attention_mask, freqs_cis)

    return ErnieImageContextParallelAttnProcessor


def prepare_ernie_image(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_ernie_image import ErnieImageSingleStreamAttnProcessor

    replace_attention_processors(model, {ErnieImageSingleStreamAttnProcessor: _processor_class()}, handle, name,
                                 type(model).__name__)


@register_cp_plan("ErnieImageTransformer2DModel", prepare=prepare_ernie_image)
def ernie_image_cp_plan(model) -> dict:
    layers = len(model.layers)
    if layers == 0:
        raise UnsupportedError(f"{type(model).__name__} has no layers to parallelize.")
    per_layer = {
        "rotary_pos_emb": split_input(split_dim=1, expected_dims=4),
        "temb": [split_input(split_dim=0, expected_dims=3) for _ in range(6)],
    }
    tokens = {"x": split_input(split_dim=0, expected_dims=3)}
    plan = first_and_every_block("layers", layers, tokens, per_layer)
    plan[f"layers.{layers - 1}"] = gather_output(gather_dim=0, expected_dims=3)
    return plan


@register_tp_plan("ErnieImageTransformer2DModel")
def ernie_image_tp_plan(model) -> TensorParallelPlan:
    block = {
        "self_attention.to_q": "colwise", "self_attention.to_k": "colwise", "self_attention.to_v": "colwise",
        "self_attention.to_out.0": "rowwise",
        # GELU-gated MLP: fc2(up(x) * gelu(gate(x)))
        "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.linear_fc2": "rowwise",
    }
    linears = present(model, block, "layers")
    # One modulation for every layer, and the output layer's.
    linears["adaLN_modulation.1"] = GATHER
    linears["final_norm.linear"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs={"layers.*.self_attention": ATTN_ATTRS})
