"""Context- and tensor-parallel plans for GLM-Image (`GlmImageTransformer2DModel`); diffusers ships neither.

Plan: text and image tokens are split where they enter the first block (the prior-token embedding is added to the
image tokens before it), the image RoPE table (cos, sin) at every block (the forward passes it whole to each);
gather after `proj_out`. Joint attention [text, image] applies RoPE to the image part only, by local lengths.

The KV cache of image editing works on shards too: a condition-image pass stores this rank's keys and values (all
heads, before the all-to-all), and a later pass prepends them to its own; attention takes keys in any order, so the
gathered set is the whole one. (Under diffusers' uneven split the condition pass, whose prompt is empty, is
refused: that split cannot cut an empty sequence.)

Mask: the processor turns a (batch, text) mask into an additive (query x key) one of +1 where both tokens are real.
An all-ones mask adds the same constant to every score (softmax ignores it), so `GlmImageContextParallelAttnProcessor`
drops it (exact); a mask with padding is refused under context parallelism (its query-by-key form has no split
diffusers' context-parallel attention can take). Undone on detach.
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


def _processor_class():
    from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor

    class GlmImageContextParallelAttnProcessor(GlmImageAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                     kv_cache=None):
            if attention_mask is not None and self._parallel_config is not None:
                if not bool((attention_mask != 0).all()):
                    raise UnsupportedError(
                        "GLM-Image with context parallelism: the text attention_mask marks padded tokens; the model "
                        "turns it into a query-by-key mask, which diffusers' context-parallel attention cannot split. "
                        "Pass the prompt without padding (attention_mask=None), or run without ulysses_size / "
                        "ring_size (tp_size works with any mask)."
                    )
                attention_mask = None  # all ones: +1 on every score, which softmax ignores
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    kv_cache)

    return GlmImageContextParallelAttnProcessor


def _refuse_empty_prompt_uneven(config):
    """A torch pre-hook on the first block (it runs before diffusers' split hook): the condition-image pass of
    image editing has an empty prompt, which diffusers' uneven split cannot cut (the even split can)."""
    degree = config.cp_degree

    def check(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if text is None or text.shape[1] or hidden is None:
            return
        uneven = config.ulysses_anything or config.ring_anything or hidden.shape[1] % degree
        if uneven:
            raise UnsupportedError(
                f"GLM-Image with context parallelism: this call (a condition-image pass of image editing) has an "
                f"empty prompt and {hidden.shape[1]} image tokens; diffusers' uneven split (ulysses_anything / "
                f"ring_anything, or image tokens {degree} ranks do not divide) cannot cut an empty sequence. Use "
                f"condition images whose token count divides by {degree}, without *_anything."
            )

    return check


def prepare_glm_image(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor

    replace_attention_processors(model, {GlmImageAttnProcessor: _processor_class()}, handle, name,
                                 type(model).__name__)
    removers = []
    handle.add(f"{name}: empty-prompt check", lambda: [r.remove() for r in removers])
    removers.append(model.transformer_blocks[0].register_forward_pre_hook(_refuse_empty_prompt_uneven(config),
                                                                          with_kwargs=True))


@register_cp_plan("GlmImageTransformer2DModel", prepare=prepare_glm_image)
def glm_image_cp_plan(model) -> dict:
    blocks = len(model.transformer_blocks)
    if blocks == 0:
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    tokens = split_input(split_dim=1, expected_dims=3)
    first = {"hidden_states": tokens, "encoder_hidden_states": tokens}
    rope_half = split_input(split_dim=0, expected_dims=2)
    every = {"image_rotary_emb": [rope_half, rope_half]}
    plan = first_and_every_block("transformer_blocks", blocks, first, every)
    plan["proj_out"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


@register_tp_plan("GlmImageTransformer2DModel")
def glm_image_tp_plan(model) -> TensorParallelPlan:
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",  # one MLP for both streams
        "norm1.linear": GATHER,
    }
    linears = present(model, block, "transformer_blocks")
    # The glyph (text) and prior-token projections: MLPs on the hidden width, split like the blocks' MLP.
    for mlp in ("glyph_projector", "prior_projector"):
        linears[f"{mlp}.net.0.proj"] = "colwise"
        linears[f"{mlp}.net.2"] = "rowwise"
    linears["norm_out.linear"] = GATHER
    if isinstance(getattr(model, "prior_token_embedding", None), torch.nn.Embedding):
        # the prior tokens' table (42M of 2.9B parameters): split by width, rows gathered (whole, it kept 0.508 / 0.261)
        linears["prior_token_embedding"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs={"transformer_blocks.*.attn1": ATTN_ATTRS})
