"""Plans shared by the FLUX.1 derivatives (LongCat-Image, Ovis-Image, Bria, Bria FIBO): the same double-stream and
single-stream blocks (attention projections, AdaLN-Zero modulation, `proj_mlp` / `proj_out`), some with gated
(SwiGLU) feed-forwards. No registration here: each family file registers its class with these builders.

Context parallel: FLUX.1's split (what diffusers ships as Flux's `_cp_plan`): the image and text tokens and their
position ids are split as they enter the model, so each rank holds [its text shard, its image shard] and the RoPE
table computed from exactly those ids; attention goes through diffusers' dispatcher in these processors, and every
block works token by token outside attention; the output is gathered after `proj_out`.

Masks over [all text, all image] (Chroma's prompt-padding mask, Bria FIBO's for prompts of different lengths): after
the split the whole mask no longer matches the order of the tokens attention sees. `prepare_mask_reordering` gives
each attention a subclass of its processor that
- drops a mask that is the same for every key (boolean all True, or one additive value per row: softmax does not
  change), so every mode runs an unpadded prompt;
- under Ulysses (no ring) reorders a real mask's key dimension (and its query dimension, for an N x N mask) to the
  order Ulysses gathers the sequence: [text_0, image_0, text_1, image_1, ...], each part as long as the split cut it;
- under ring attention passes a real mask on to diffpar's ring guard, which refuses it clearly on every rank (the
  ring applies one rank's mask to every rank's keys).
The whole text length is recorded by a forward pre-hook on the model (torch runs it before diffusers' split hook).
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import Packed
from diffpar.families.transformers.flux import flux_modulation
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import (
    ATTN_ATTRS,
    JOINT_ATTENTION,
    TensorParallelPlan,
    present,
)


def flux_token_split_plan(extra_inputs: dict | None = None) -> dict:
    """Split the image/text tokens and position ids where they enter the model; gather after `proj_out`."""
    tokens = split_input(split_dim=1, expected_dims=3)
    ids = split_input(split_dim=0, expected_dims=2)
    return {
        "": {"hidden_states": tokens, "encoder_hidden_states": tokens, "img_ids": ids, "txt_ids": ids,
             **(extra_inputs or {})},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


def _feed_forward_in(linear, out_linear):
    """A feed-forward's input projection: plain colwise, or for a gated one (twice as wide as the output
    projection reads) its value and gate halves split separately."""
    half = out_linear.in_features
    return Packed("colwise", (half, half)) if linear.out_features == 2 * half else "colwise"


def flux_like_tp_plan(model) -> TensorParallelPlan:
    """FLUX.1's tensor-parallel plan, with gated feed-forwards and gated single-block MLPs packed by halves."""
    linears = {}
    attrs = {"transformer_blocks.*.attn": ATTN_ATTRS, "single_transformer_blocks.*.attn": ATTN_ATTRS}
    if len(model.transformer_blocks):
        block = model.transformer_blocks[0]
        double = dict(JOINT_ATTENTION)
        for stream in ("ff", "ff_context"):
            ff = getattr(block, stream, None)
            if ff is not None:
                double[f"{stream}.net.0.proj"] = _feed_forward_in(ff.net[0].proj, ff.net[2])
                double[f"{stream}.net.2"] = "rowwise"
        linears.update(present(model, double, "transformer_blocks"))
    if len(model.single_transformer_blocks):
        block = model.single_transformer_blocks[0]
        mlp = block.mlp_hidden_dim
        inner = block.proj_out.in_features - mlp
        gated = block.proj_mlp.out_features == 2 * mlp
        single = {
            "attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise",
            "proj_mlp": Packed("colwise", (mlp, mlp)) if gated else "colwise",
            # proj_out reads cat([attention output, MLP hidden]): two column-sharded streams.
            "proj_out": Packed("rowwise", (inner, mlp)),
        }
        linears.update(present(model, single, "single_transformer_blocks"))
        if gated:  # the block splits proj_mlp's output by its own mlp_hidden_dim: the per-rank width
            attrs["single_transformer_blocks.*"] = ("mlp_hidden_dim",)
    linears.update(flux_modulation(model))
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)


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


def mask_for_shards(mask: torch.Tensor, parallel_config, text_tokens: int):
    """The model's mask over [all text, all image] -> the mask for the sequence attention sees on this rank."""
    if uniform_over_keys(mask):
        return None
    cp = parallel_config.context_parallel_config
    if cp.ring_degree != 1:
        return mask  # the ring guard refuses a real mask on every rank together
    total = mask.shape[-1]
    index = torch.tensor(ulysses_sequence_order([(0, text_tokens), (text_tokens, total - text_tokens)],
                                                cp.ulysses_degree), device=mask.device)
    mask = mask.index_select(-1, index)
    return mask.index_select(-2, index) if mask.dim() > 1 and mask.shape[-2] == total else mask


def _mask_reordering_processor(base, lengths: dict):
    """A subclass of diffusers' processor `base` (FLUX.1's call signature) that lays the mask out for the shards."""

    class MaskReorderingProcessor(base):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if attention_mask is not None and self._parallel_config is not None:
                attention_mask = mask_for_shards(attention_mask, self._parallel_config, lengths["text"])
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    MaskReorderingProcessor.__name__ = f"{base.__name__}ContextParallel"
    return MaskReorderingProcessor


def prepare_mask_reordering(model, handle, name: str, bases: list[type]) -> None:
    """Record each call's whole text length and give every attention whose processor is one of `bases` the mask
    reordering subclass; undo restores both."""
    lengths: dict = {}

    def record_text_length(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        lengths["text"] = None if text is None else text.shape[1]

    hooks = []
    handle.add(f"{name}: record the prompt length", lambda: [h.remove() for h in hooks])
    hooks.append(model.register_forward_pre_hook(record_text_length, with_kwargs=True))
    replace_attention_processors(model, {b: _mask_reordering_processor(b, lengths) for b in bases}, handle, name,
                                 type(model).__name__)
