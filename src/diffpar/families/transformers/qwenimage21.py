"""Qwen-Image 2.1 (`QwenImage21Transformer2DModel`): context-parallel plan (diffusers ships the tensor-parallel one).

One sequence, [prompt with condition-image slots, target image], through single-stream blocks whose attention is
block-causal: each prompt segment sees the keys before it and its own (text causally), the target sees everything.
The processor computes that as several attention calls over ranges of the whole sequence, which diffusers'
context-parallel attention (every call over sequence shards) cannot express.

Plan (Ulysses only): the joint sequence is split where it enters the first block and gathered after the last;
each block's per-token modulation mask is split with it; the RoPE table, the segments and the padding mask stay
whole. Each block attention gets `QwenImage21UlyssesAttnProcessor`: q, k and v of the local tokens go through
one all-to-all to (whole sequence, this rank's heads), diffusers' own processor then runs its exact block-causal
attention (segments, padding mask, KV cache: each rank caches its heads) locally, and one all-to-all brings the
output back to the local tokens before `to_out`. Undone on detach (the original processor objects come back).

`ulysses_anything` (a joint sequence the degree does not divide, the usual case with real prompts): the split cuts
unevenly and the all-to-alls carry each rank's own token count.

Not supported: ring attention (it splits the keys, which the segment structure needs whole), and a head count (per
tensor-parallel rank) the Ulysses degree does not divide.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input, ulysses_group
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import first_and_every_block
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan

_RING_REFUSAL = (
    "Qwen-Image 2.1's attention is block-causal over one joint sequence (each prompt segment attends only to the "
    "keys before it), computed as several attention calls over ranges of the whole sequence; ring attention splits "
    "the keys across ranks and cannot run those ranges"
)


def _all_to_all(x: torch.Tensor, group, output_sizes=None, input_sizes=None) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol

    out = funcol.all_to_all_single(x.contiguous(), output_sizes, input_sizes, group)
    return out.wait() if hasattr(out, "wait") else out


def sequence_to_heads(x: torch.Tensor, sizes: list[int], rank: int, group, head_dim: int) -> torch.Tensor:
    """(B, sizes[rank] tokens, local heads * D) -> (B, all tokens, local heads / degree * D), tokens in rank order.
    `sizes`: every rank's token count (unequal under ulysses_anything)."""
    b, s, c = x.shape
    degree = len(sizes)
    if (c // head_dim) % degree:
        raise UnsupportedError(
            f"Qwen-Image 2.1 with ulysses_size={degree}: each rank computes {c // head_dim} attention heads, which "
            f"{degree} Ulysses ranks cannot share. Use a ulysses_size (times tp_size) that divides the head count."
        )
    part = c // degree
    send = x.reshape(b, s, degree, part).permute(2, 0, 1, 3).flatten()  # head group j goes to rank j
    recv = _all_to_all(send, group, [b * n * part for n in sizes], [b * s * part] * degree)
    pieces = recv.split([b * n * part for n in sizes])
    return torch.cat([p.reshape(b, n, part) for p, n in zip(pieces, sizes)], dim=1)


def heads_to_sequence(y: torch.Tensor, sizes: list[int], rank: int, group) -> torch.Tensor:
    """The inverse of `sequence_to_heads`."""
    b, _, part = y.shape
    degree = len(sizes)
    send = torch.cat([p.flatten() for p in y.split(sizes, dim=1)])  # rank j's tokens go to rank j
    recv = _all_to_all(send, group, [b * sizes[rank] * part] * degree, [b * n * part for n in sizes])
    return recv.reshape(degree, b, sizes[rank], part).permute(1, 2, 0, 3).reshape(b, sizes[rank], degree * part)


class _HeadShardedAttention:
    """The attention module as diffusers' processor sees it under Ulysses: projections yield the whole sequence for
    this rank's heads, and `to_out` takes them back to the local tokens. Everything else is the module's own."""

    def __init__(self, attn, sizes: list[int], rank: int, group):
        self._attn = attn
        head_dim = attn.inner_dim // attn.heads

        def project(linear):
            return lambda h: sequence_to_heads(linear(h), sizes, rank, group, head_dim)

        self.to_q, self.to_k, self.to_v = project(attn.to_q), project(attn.to_k), project(attn.to_v)
        self.to_out = [lambda o: attn.to_out[0](heads_to_sequence(o, sizes, rank, group)), attn.to_out[1]]

    def __getattr__(self, name):
        return getattr(self._attn, name)


def _processor_class(base):
    """A subclass of diffusers' processor `base` (built lazily from the installed release)."""

    class QwenImage21UlyssesAttnProcessor(base):
        def __call__(self, attn, hidden_states, attention_mask=None, rotary_emb=None, *args, **kwargs):
            config = self._parallel_config
            if config is None:
                return super().__call__(attn, hidden_states, attention_mask, rotary_emb, *args, **kwargs)
            cp = config.context_parallel_config
            if cp.ring_degree != 1:
                raise UnsupportedError(f"{_RING_REFUSAL}. Use ulysses_size instead of ring_size.")
            group = ulysses_group(config)
            rank, degree = dist.get_rank(group), cp.ulysses_degree
            # The RoPE table stays whole: its length is the sequence's, cut as the split hooks cut it (tensor_split).
            total = rotary_emb.shape[0] if rotary_emb is not None else degree * hidden_states.shape[1]
            sizes = [total // degree + (1 if r < total % degree else 0) for r in range(degree)]
            sharded = _HeadShardedAttention(attn, sizes, rank, group)
            self._parallel_config = None  # the attention itself runs locally, on the whole sequence
            try:
                return super().__call__(sharded, hidden_states, attention_mask, rotary_emb, *args, **kwargs)
            finally:
                self._parallel_config = config

    QwenImage21UlyssesAttnProcessor.__name__ = f"{base.__name__}Ulysses"
    return QwenImage21UlyssesAttnProcessor


def prepare_qwenimage21(model, config, handle, name: str) -> None:
    from diffusers.models.transformers import transformer_qwenimage21 as q21

    if config.ring_degree > 1 or config.ring_anything:
        raise UnsupportedError(
            f"{type(model).__name__} with ring attention: {_RING_REFUSAL}. Use ulysses_size (with "
            "ulysses_anything=True for sequences the degree does not divide)."
        )
    bases = [q21.QwenImage21AttnProcessor]
    if getattr(q21, "QwenImage21FlexAttnProcessor", None) is not None:
        bases.append(q21.QwenImage21FlexAttnProcessor)
    replace_attention_processors(model, {b: _processor_class(b) for b in bases}, handle, name, type(model).__name__)


@register_cp_plan("QwenImage21Transformer2DModel", prepare=prepare_qwenimage21)
def qwenimage21_cp_plan(model) -> dict:
    blocks = len(model.transformer_blocks)
    if blocks == 0:
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    tokens = {"hidden_states": split_input(split_dim=1, expected_dims=3)}
    per_block = {"target_token_mask": split_input(split_dim=0, expected_dims=1)}  # per-token modulation rows
    plan = first_and_every_block("transformer_blocks", blocks, tokens, per_block)
    plan[f"transformer_blocks.{blocks - 1}"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


@register_tp_plan("QwenImage21Transformer2DModel")
def _qwenimage21(model) -> TensorParallelPlan:
    """For releases without diffusers' `_tp_plan`, and what diffpar adds to it: the one modulation projection shared
    by every block, gathered. Head counts stay whole (the processor reshapes by head width)."""
    linears = {"modulation.1": GATHER}
    if len(model.transformer_blocks):
        linears.update({
            "transformer_blocks.*.attn.to_q": "colwise", "transformer_blocks.*.attn.to_k": "colwise",
            "transformer_blocks.*.attn.to_v": "colwise", "transformer_blocks.*.attn.to_out.0": "rowwise",
            "transformer_blocks.*.img_mlp.proj": "colwise", "transformer_blocks.*.img_mlp.gate_layer": "colwise",
            "transformer_blocks.*.img_mlp.out": "rowwise",
        })
    return TensorParallelPlan(linears=linears)
