"""Context- and tensor-parallel plans for Nucleus-MoE Image (`NucleusMoEImageTransformer2DModel`); diffusers ships
neither.

Attention: image queries attend to [image keys, text keys] (the text is projected per block and has keys and
values only). Plan: the image tokens are split as they enter the first block; at every block the prompt (dim 1)
and both RoPE tables (image, text: dim 0) are split the same way, so each rank projects and rotates its own text
shard; gather after `proj_out`. Keys and values of both streams then go through the context-parallel attention.

Forward changes, undone on detach:
1. `NucleusMoEContextParallelAttnProcessor`: the joint (batch, image + text) mask is cut to this rank's keys
   ([its image shard: all real, its text shard]), which diffpar's Ulysses mask shim gathers in key order; an
   all-True mask is dropped (the ring takes none; a real one under the ring is refused by the ring shim). The
   pipeline pads every prompt to a multiple of 8 tokens, so padded prompts are the normal case: the processor
   says it cuts the mask itself (`cuts_whole_text_mask`), which exempts it from diffpar's generic padded-prompt
   guard (`compat.diffusers_cp.guard_whole_text_mask`). Cached
   text keys (`attention_kwargs["cached_txt_key"]`, whole-prompt keys) are refused: every rank would add them all.
2. Mixture-of-experts layers route by expert choice: each expert takes the top tokens of the WHOLE sequence, so a
   shard cannot route by itself. Each MoE layer gathers its input sequence, routes and runs on all of it, and keeps
   this rank's part of the output (attention stays split; the MoE MLP is computed whole on every rank).

Tensor parallel: heads by q/k/v columns (GQA k/v and the text k/v by their own heads), outputs by rows; dense and
shared-expert SwiGLU MLPs by their hidden width; modulation and the per-block text projection gathered. The routed
experts (packed `SwiGLUExperts` parameters, not Linear layers) are split along their hidden width (gate/up columns,
down rows) with the output all-reduced; the router (small) stays whole, so every rank routes the same tokens.
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp_hooks import gather_output, shard, split_input, unshard
from diffpar.engines.tp_shard import GATHER, Packed, PackedParameters
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, register_tp_plan
from diffpar.patch import Patch


def _processor_class(kept: dict):
    from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoEAttnProcessor2_0

    class NucleusMoEContextParallelAttnProcessor(NucleusMoEAttnProcessor2_0):
        cuts_whole_text_mask = True  # the generic padded-prompt guard leaves this model to it (see below)

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None, cached_txt_key=None, cached_txt_value=None):
            if self._parallel_config is not None:
                if cached_txt_key is not None:
                    raise UnsupportedError(
                        "Nucleus-MoE with context parallelism: cached_txt_key / cached_txt_value hold the whole "
                        "prompt's keys, which every rank would add to the gathered keys. Pass the prompt itself "
                        "(encoder_hidden_states) instead of cached text keys."
                    )
                if attention_mask is not None:
                    if bool(attention_mask.all()):
                        attention_mask = None
                    else:
                        cp = self._parallel_config.context_parallel_config
                        text = shard(attention_mask[:, attention_mask.shape[1] - kept["text_tokens"]:], 1, cp)
                        image = text.new_ones((text.shape[0], hidden_states.shape[1]))
                        attention_mask = torch.cat([image, text], dim=1)[:, None, None, :]
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    cached_txt_key, cached_txt_value)

    return NucleusMoEContextParallelAttnProcessor


def _whole_sequence_moe(model):
    """Wrapper of NucleusMoELayer.forward(hidden_states, hidden_states_unmodulated, timestep): route on the whole
    sequence, keep this rank's part."""

    def wrapper(wrapped, instance, args, kwargs):
        parallel = getattr(model, "_parallel_config", None)
        if parallel is None:
            return wrapped(*args, **kwargs)
        cp = parallel.context_parallel_config
        names = ("hidden_states", "hidden_states_unmodulated", "timestep")
        bound = dict(zip(names, args), **kwargs)
        bound["hidden_states"] = unshard(bound["hidden_states"], 1, cp)
        bound["hidden_states_unmodulated"] = unshard(bound["hidden_states_unmodulated"], 1, cp)
        return shard(wrapped(**bound), 1, cp)

    return wrapper


def prepare_nucleusmoe(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_nucleusmoe_image import (
        NucleusMoEAttnProcessor2_0,
        NucleusMoELayer,
    )

    kept: dict = {}
    label = type(model).__name__
    replace_attention_processors(model, {NucleusMoEAttnProcessor2_0: _processor_class(kept)}, handle, name, label)
    removers = []
    handle.add(f"{name}: record the prompt length", lambda: [r.remove() for r in removers])
    removers.append(model.txt_norm.register_forward_pre_hook(
        lambda module, args: kept.__setitem__("text_tokens", args[0].shape[1])))
    patches: list[Patch] = []
    handle.add(f"{name}: MoE layers route on the whole sequence", lambda: [p.undo() for p in reversed(patches)])
    for module_name, module in model.named_modules():
        if isinstance(module, NucleusMoELayer):
            patches.append(Patch(module, "forward", _whole_sequence_moe(model), label=f"{label}.{module_name}"))


@register_cp_plan("NucleusMoEImageTransformer2DModel", prepare=prepare_nucleusmoe)
def nucleusmoe_cp_plan(model) -> dict:
    blocks = len(model.transformer_blocks)
    if blocks == 0:
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    first = {"hidden_states": split_input(split_dim=1, expected_dims=3)}
    rope = split_input(split_dim=0, expected_dims=2)
    every = {"encoder_hidden_states": split_input(split_dim=1, expected_dims=3), "image_rotary_emb": [rope, rope]}
    plan = first_and_every_block("transformer_blocks", blocks, first, every)
    plan["proj_out"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


def _swiglu(prefix: str, module) -> dict:
    """diffusers' FeedForward with activation "swiglu": net.0.proj makes [hidden, gate] in one Linear."""
    inner = module.net[2].in_features
    return {f"{prefix}.net.0.proj": Packed("colwise", (inner, inner)), f"{prefix}.net.2": "rowwise"}


@register_tp_plan("NucleusMoEImageTransformer2DModel")
def nucleusmoe_tp_plan(model) -> TensorParallelPlan:
    linears, experts = {}, {}
    for index, block in enumerate(model.transformer_blocks):
        path = f"transformer_blocks.{index}"
        for proj in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj"):
            linears[f"{path}.attn.{proj}"] = "colwise"
        linears[f"{path}.attn.to_out.0"] = "rowwise"
        linears[f"{path}.img_mod.1"] = GATHER
        linears[f"{path}.encoder_proj"] = GATHER
        mlp = block.img_mlp
        if block.moe_enabled:
            linears.update(_swiglu(f"{path}.img_mlp.shared_expert", mlp.shared_expert))
            # Routed experts, packed: gate_up (E, D, [gate I | up I]) by its gate and up columns, down (E, I, D) by
            # the same rows; each rank computes every expert on its part of I, the outputs summed over the ranks.
            inner = mlp.experts.moe_intermediate_dim
            experts[f"{path}.img_mlp.experts"] = PackedParameters(
                (("gate_up_proj", 2, (inner, inner)), ("down_proj", 1, (inner,))),
                width_attribute="moe_intermediate_dim")
        else:
            linears.update(_swiglu(f"{path}.img_mlp", mlp))
    linears["norm_out.linear"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs={"transformer_blocks.*.attn": ATTN_ATTRS},
                              reduced_parameters=experts)
