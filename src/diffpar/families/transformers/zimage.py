"""Context-parallel plan for Z-Image (`ZImageTransformer2DModel`); diffusers ships none.

The forward takes lists of per-sample tensors and builds padded batch sequences inside methods, not modules, so
the plan splits where those sequences first enter a module: the first block of each stack (noise refiner on image
tokens, context refiner on caption tokens, SigLIP refiner in omni mode, and the main layers on the unified
sequence). Each stack's RoPE table (and, in omni mode, its per-token noise mask) is passed unsplit to every block
of the stack, so those are split at every block. The refiners' outputs are gathered at their last block because
the forward then concatenates them per sample; the main stack is gathered after the final layer.

The padding mask is deliberately left whole: after Ulysses' all-to-all each rank attends over the whole sequence
in its original order, so the whole mask is the right one on every release (0.36 has no mask gather). A padding
mask appears only for batches whose samples differ in length; diffusers' ring cannot apply one, and diffpar's
ring shim raises a clear error for it.

One forward change, undone on detach: 0.36 passes a mask even when every sample has the same length (all True),
and its context-parallel attention refuses any mask. Each attention gets `ZImageContextParallelAttnProcessor`,
which drops a mask that masks nothing (exact) and, on a release that cannot mask, refuses a real one clearly.
"""
from __future__ import annotations

import inspect

from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks
from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.errors import UnsupportedError
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors

# Sequences are padded to multiples of 32 per sample (SEQ_MULTI_OF in diffusers), so even splits over 2 and 4
# ranks always exist; *_anything covers other degrees.


def _block_accepts(param: str) -> bool:
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    return param in inspect.signature(ZImageTransformerBlock.forward).parameters


def _stack_plan(stack: str, num_blocks: int, per_block: dict, gather_last: bool) -> dict:
    """Split `x` entering block 0, split `per_block` inputs at every block, optionally gather the last output."""
    if num_blocks == 0:
        return {}
    tokens = {"x": split_input(split_dim=1, expected_dims=3)}
    plan = first_and_every_block(stack, num_blocks, tokens, per_block)
    if gather_last:
        plan[f"{stack}.{num_blocks - 1}"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


def _processor_class():
    """Built lazily: the base class comes from the installed diffusers."""
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    class ZImageContextParallelAttnProcessor(ZSingleStreamAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
            if attention_mask is not None and self._parallel_config is not None:
                # The mask is the whole (batch, sequence) one, the same on every rank.
                if bool(attention_mask.all()):
                    attention_mask = None
                elif not context_parallel_attention_takes_masks():
                    raise UnsupportedError(
                        "Z-Image: the samples in this batch differ in length, which needs a padding mask, and this "
                        "diffusers release's context-parallel attention takes none (0.37+ does). Run samples of "
                        "different sizes or prompt lengths in separate calls, or upgrade diffusers."
                    )
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)

    return ZImageContextParallelAttnProcessor


def prepare_zimage(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    replace_attention_processors(model, {ZSingleStreamAttnProcessor: _processor_class()}, handle, name,
                                 type(model).__name__)


@register_cp_plan("ZImageTransformer2DModel", prepare=prepare_zimage)
def zimage_cp_plan(model) -> dict:
    rope = {"freqs_cis": split_input(split_dim=1, expected_dims=3)}
    # The noise refiner and main layers get a per-token noise mask (omni mode, 0.37+); the forward passes it
    # positionally (None outside omni mode), so it can be named in the plan only where the block takes it.
    noisy = dict(rope)
    if _block_accepts("noise_mask"):
        noisy["noise_mask"] = split_input(split_dim=1, expected_dims=2)

    omni_capable = getattr(model, "siglip_refiner", None) is not None
    plan = {}
    plan.update(_stack_plan("noise_refiner", len(model.noise_refiner), noisy, gather_last=True))
    plan.update(_stack_plan("context_refiner", len(model.context_refiner), rope, gather_last=True))
    if omni_capable:
        plan.update(_stack_plan("siglip_refiner", len(model.siglip_refiner), rope, gather_last=True))
    # In omni mode the final layer selects per-token modulation with the whole noise mask, so an omni-capable
    # model is gathered after its last block; otherwise after the final layer (a 64-wide output, not 3840-wide,
    # and after every ControlNet residual, which a parallel ControlNet adds sharded like the sequence).
    plan.update(_stack_plan("layers", len(model.layers), noisy, gather_last=omni_capable))
    if not omni_capable:
        for key in model.all_final_layer.keys():
            plan[f"all_final_layer.{key}"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


@register_tp_plan("ZImageTransformer2DModel")
def _zimage(model) -> TensorParallelPlan:
    block = {
        "attention.to_q": "colwise", "attention.to_k": "colwise", "attention.to_v": "colwise",
        "attention.to_out.0": "rowwise",
        # SwiGLU: w2(silu(w1 x) * w3 x)
        "feed_forward.w1": "colwise", "feed_forward.w3": "colwise",
        "feed_forward.w2": "rowwise",
    }
    linears, attrs = {}, {}
    # The refiners run on the image and caption streams before the main layers: same block type, same plan.
    block_with_modulation = {**block, "adaLN_modulation.0": GATHER}
    for container in ("noise_refiner", "context_refiner", "layers"):
        found = present(model, block_with_modulation, container)
        if found:
            linears.update(found)
            attrs[f"{container}.*.attention"] = ATTN_ATTRS
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
