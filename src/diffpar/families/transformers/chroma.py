"""Chroma (`ChromaTransformer2DModel`): context- and tensor-parallel plans; diffusers ships neither.

Chroma is FLUX.1's blocks (`FluxAttention` + `FluxAttnProcessor`, which attends through diffusers' dispatcher)
with the modulation computed once for all blocks (`distilled_guidance_layer`) and an attention mask.

Context parallel: FLUX.1's split (diffusers' `_cp_plan` for Flux): the image and text tokens and their position
ids are split as they enter the model, so each rank holds [its text shard, its image shard] and the RoPE table of
exactly those tokens; the output is gathered after `proj_out`. Every block works token by token outside attention.

The mask: the pipeline passes one over [all text, all image] tokens (1 for real prompt tokens and the image, 0 for
prompt padding; a float mask that diffusers adds to the attention logits), and each block turns it into a
(B, 1, N, N) query x key mask. After the split the whole mask no longer matches the tokens' order. One forward
change, undone on detach: each block attention gets `ChromaContextParallelAttnProcessor`, which
- drops a mask that is the same for every key (a constant added to every logit of a row changes nothing; the mask
  of a prompt without padding), so every mode runs it;
- under Ulysses (no ring) reorders a real mask, rows and columns, to the order Ulysses gathers the sequence:
  [text_0, image_0, text_1, image_1, ...], each part as long as the split cut it;
- under ring attention leaves a real mask to diffpar's ring guard, which refuses it clearly (the ring applies one
  rank's mask to every rank's keys).
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.flux import _flux as flux_tp_plan
from diffpar.families.transformers.sd3 import replace_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan
from diffpar.engines.tp_shard import GATHER


def split_sizes(total: int, degree: int) -> list[int]:
    """`total` tokens over `degree` ranks as diffusers' split hooks cut them (even chunks, else the first ranks one
    longer, as tensor_split does)."""
    return [total // degree + (1 if r < total % degree else 0) for r in range(degree)]


def ulysses_sequence_order(streams: list[tuple[int, int]], degree: int) -> list[int]:
    """Positions, in the whole sequence, of the tokens Ulysses gathers: rank by rank, each rank's shard of every
    stream in the order given. `streams`: (start in the whole sequence, length) of each stream, in each rank's
    local order."""
    cuts = [split_sizes(length, degree) for _, length in streams]
    starts = [start for start, _ in streams]
    order = []
    for rank in range(degree):
        for s, sizes in enumerate(cuts):
            order.extend(range(starts[s], starts[s] + sizes[rank]))
            starts[s] += sizes[rank]
    return order


def uniform_over_keys(mask: torch.Tensor) -> bool:
    """Whether the mask masks nothing: boolean all True, or additive with one value per row."""
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == mask[..., :1]).all())


def _processor_class(lengths: dict):
    """Built lazily: the base class comes from the installed diffusers. `lengths["text"]`: this call's whole text
    length (recorded before the split)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class ChromaContextParallelAttnProcessor(FluxAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if attention_mask is not None and self._parallel_config is not None:
                attention_mask = self._mask_for_shards(attention_mask)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

        def _mask_for_shards(self, mask):
            if uniform_over_keys(mask):
                return None
            cp = self._parallel_config.context_parallel_config
            if cp.ring_degree != 1:
                return mask  # the ring guard refuses a real mask on every rank together
            text = lengths["text"]
            order = ulysses_sequence_order([(0, text), (text, mask.shape[-1] - text)], cp.ulysses_degree)
            index = torch.tensor(order, device=mask.device)
            return mask.index_select(-1, index).index_select(-2, index)

    return ChromaContextParallelAttnProcessor


def prepare_chroma(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    label = type(model).__name__
    lengths: dict = {}

    def record_text_length(module, args, kwargs):
        # A torch pre-hook runs before diffusers' split hooks (they wrap forward): the whole prompt length.
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        lengths["text"] = None if text is None else text.shape[1]

    hooks = []
    handle.add(f"{name}: record the prompt length", lambda: [h.remove() for h in hooks])
    hooks.append(model.register_forward_pre_hook(record_text_length, with_kwargs=True))
    replace_attention_processors(model, {FluxAttnProcessor: _processor_class(lengths)}, handle, name, label)


@register_cp_plan("ChromaTransformer2DModel", prepare=prepare_chroma)
def chroma_cp_plan(model) -> dict:
    tokens = split_input(split_dim=1, expected_dims=3)
    ids = split_input(split_dim=0, expected_dims=2)
    return {
        "": {"hidden_states": tokens, "encoder_hidden_states": tokens, "img_ids": ids, "txt_ids": ids},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("ChromaTransformer2DModel")
def _chroma(model) -> TensorParallelPlan:
    """FLUX.1's blocks; the modulation is one MLP for all blocks (the approximator), whose layers are split like
    a feed-forward's, and the blocks' own norms have no weights."""
    plan = flux_tp_plan(model)
    linears = {k: v for k, v in plan.linears.items() if v != GATHER}
    if len(model.distilled_guidance_layer.layers):
        linears["distilled_guidance_layer.layers.*.linear_1"] = "colwise"
        linears["distilled_guidance_layer.layers.*.linear_2"] = "rowwise"
    return TensorParallelPlan(linears=linears, attention_attrs=plan.attention_attrs)
