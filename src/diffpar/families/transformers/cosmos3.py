"""Cosmos 3 (`Cosmos3OmniTransformer`): context- and tensor-parallel plans; diffusers ships neither (the packed
dual-pathway sequence does not fit its declarative plan; the class leaves two seams, a shard and a gather function,
for an outside helper, which is what this plan installs through `compat.diffusers_cp_hooks`).

The forward runs one packed sequence as two pathways in every layer: the "understanding" prefix (prompt tokens)
attends causally to itself only, and the "generation" tokens (vision, sound, action) attend to every key of both.
CP plan:
- the generation tokens and their rotary rows are split over the ranks at the shard seam (torch.tensor_split's
  shards, the first ranks one more under the uneven paths) and gathered at the gather seam, after the final norms;
  every later step (the decode by global indexes) sees the whole sequence;
- the understanding prefix stays whole on every rank: it never looks at the generation tokens, so its causal
  attention runs locally, exactly, at the cost of repeating the (short) prompt's work on each rank;
- generation attention goes through diffusers' dispatcher with the parallel config, over keys = [this rank's
  share of the prefix keys, this rank's generation keys]: across the ranks those are every key exactly once, and
  the attention is not causal, so the order the all-to-all or the ring assembles them in does not matter. Key/value
  heads are repeated to the query heads first (grouped-query attention), so Ulysses splits all three by the same
  heads.
The processor is swapped for the context-parallel one while parallel; the seams are instance attributes removed on
detach.

TP plan: each layer's two attention pathways by heads (queries, keys, values colwise; outputs rowwise), both MLPs
by width; the token embedding by width (its rows gathered). `lm_head` is never called by the forward; it is split
by columns so that it does not stay whole on every rank.
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp import gather_uneven, uneven_path_for
from diffpar.compat.diffusers_cp_group import token_shards
from diffpar.compat.diffusers_cp_hooks import occupied_cp_seams, remove_cp_seams, set_cp_seams
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, present, register_tp_plan


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _shard(tensor: torch.Tensor, shards) -> torch.Tensor:
    return torch.tensor_split(tensor, shards.size, dim=0)[shards.rank]


def _check_lengths(parallel_config, **lengths: int) -> None:
    """Lengths the degree does not divide take diffusers' uneven path for this call; without one, every rank's
    share of each split length must be the same size."""
    cp = parallel_config.context_parallel_config
    parts = cp.ulysses_degree * cp.ring_degree
    uneven = {name: n for name, n in lengths.items() if n % parts}
    if not uneven:
        return
    path = uneven_path_for(cp)
    if path is None:
        raise UnsupportedError(
            f"Cosmos3OmniTransformer: {uneven} (prompt prefix and generation tokens of the packed sequence) do not "
            f"divide over {parts} context-parallel ranks, and this layout (ulysses {cp.ulysses_degree} x ring "
            f"{cp.ring_degree}) has no uneven split on the installed diffusers. Pick a size that divides them, or "
            "use Ulysses or Ring alone (their uneven paths take any length)."
        )
    # These seams split outside diffusers' split hooks, which are what switch a call whose lengths do not divide
    # to the uneven path: switch here, or the attention exchanges unequal shards as equal ones (gloo aborts). The
    # model's pre-forward hook puts the configured mode back for the next call.
    setattr(cp, path, True)


class ContextParallelCosmos3AttnProcessor:
    """diffusers' `Cosmos3AttnProcessor` on a rank holding the whole understanding prefix and a shard of the
    generation tokens: the causal prefix attention locally, the generation attention through the dispatcher over
    [this rank's share of the prefix keys, its generation keys]."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, und_seq: torch.Tensor, gen_seq: torch.Tensor, rotary_emb):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        heads, kv_heads, head_dim = attn.num_attention_heads, attn.num_key_value_heads, attn.head_dim
        q_und = attn.to_q(und_seq).view(-1, heads, head_dim)
        k_und = attn.to_k(und_seq).view(-1, kv_heads, head_dim)
        v_und = attn.to_v(und_seq).view(-1, kv_heads, head_dim)
        q_gen = attn.add_q_proj(gen_seq).view(-1, heads, head_dim)
        k_gen = attn.add_k_proj(gen_seq).view(-1, kv_heads, head_dim)
        v_gen = attn.add_v_proj(gen_seq).view(-1, kv_heads, head_dim)

        q_und = attn.norm_q(q_und)
        k_und = attn.norm_k(k_und)
        k_und_for_gen = attn.k_norm_und_for_gen(k_und) if attn.k_norm_und_for_gen is not None else k_und
        q_gen = attn.norm_added_q(q_gen)
        k_gen = attn.norm_added_k(k_gen)

        cos_und, sin_und, cos_gen, sin_gen = (t.unsqueeze(1) for t in rotary_emb)
        q_und = q_und * cos_und + _rotate_half(q_und) * sin_und
        k_und = k_und * cos_und + _rotate_half(k_und) * sin_und
        k_und_for_gen = k_und_for_gen * cos_und + _rotate_half(k_und_for_gen) * sin_und
        q_gen = q_gen * cos_gen + _rotate_half(q_gen) * sin_gen
        k_gen = k_gen * cos_gen + _rotate_half(k_gen) * sin_gen

        # The prefix is whole here and attends only to itself: local, no parallel config.
        causal_out = dispatch_attention_fn(q_und.unsqueeze(0), k_und.unsqueeze(0), v_und.unsqueeze(0),
                                           is_causal=True, enable_gqa=True, backend=self._attention_backend)
        causal_out = causal_out.squeeze(0).flatten(-2, -1)

        if self._parallel_config is None:
            all_k, all_v = torch.cat([k_und_for_gen, k_gen]), torch.cat([v_und, v_gen])
        else:
            shards = token_shards(self._parallel_config)
            all_k = torch.cat([_shard(k_und_for_gen, shards), k_gen])
            all_v = torch.cat([_shard(v_und, shards), v_gen])
        if kv_heads != heads:  # repeat to the query heads so every split (Ulysses: by heads) keeps the groups
            all_k = all_k.repeat_interleave(heads // kv_heads, dim=1)
            all_v = all_v.repeat_interleave(heads // kv_heads, dim=1)
        full_out = dispatch_attention_fn(q_gen.unsqueeze(0), all_k.unsqueeze(0), all_v.unsqueeze(0),
                                         is_causal=False, backend=self._attention_backend,
                                         parallel_config=self._parallel_config)
        full_out = full_out.squeeze(0).flatten(-2, -1)
        return attn.to_out(causal_out), attn.to_add_out(full_out)


def _parallel_config_of(model):
    return model.layers[0].self_attn.processor._parallel_config


def _shard_seam(model):
    def shard(und_seq, gen_seq, rotary_emb):
        parallel_config = _parallel_config_of(model)
        if parallel_config is None:
            return und_seq, gen_seq, rotary_emb
        _check_lengths(parallel_config, prefix=und_seq.shape[0], generation=gen_seq.shape[0])
        shards = token_shards(parallel_config)
        cos_und, sin_und, cos_gen, sin_gen = rotary_emb
        return und_seq, _shard(gen_seq, shards), (cos_und, sin_und, _shard(cos_gen, shards), _shard(sin_gen, shards))

    return shard


def _gather_seam(model):
    def gather(und_out, gen_out):
        parallel_config = _parallel_config_of(model)
        if parallel_config is None:
            return und_out, gen_out
        return und_out, gather_uneven(gen_out, 0, token_shards(parallel_config).group)

    return gather


def prepare_cosmos3(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_cosmos3 import Cosmos3AttnProcessor

    replace_attention_processors(model, {Cosmos3AttnProcessor: ContextParallelCosmos3AttnProcessor}, handle, name,
                                 type(model).__name__, within=("layers",))

    handle.add(f"{name}: token shard and gather seams", lambda: remove_cp_seams(model))
    set_cp_seams(model, _shard_seam(model), _gather_seam(model))


@register_cp_plan(
    "Cosmos3OmniTransformer", prepare=prepare_cosmos3,
    hook_splits=("shard seam (generation tokens, their rotary rows; the understanding prefix stays whole)",),
    hook_gathers=("gather seam (generation tokens, after the final norms)",),
    tokens="video",
)
def cosmos3_cp_plan(model) -> dict:
    label = type(model).__name__
    if not len(model.layers):
        raise UnsupportedError(f"{label} has no decoder layers to parallelize.")
    occupied = occupied_cp_seams(model)
    if occupied:
        raise UnsupportedError(
            f"{label}: `{occupied[0]}` is already set (another context-parallel helper, e.g. diffusers' "
            "examples/cosmos3/cosmos_parallel.py, is installed). Remove it before diffpar parallelizes the model."
        )
    return {}  # no diffusers hooks: the shard and gather seams of the forward do the split (see prepare_cosmos3)


_LAYER = {
    "self_attn.to_q": "colwise", "self_attn.to_k": "colwise", "self_attn.to_v": "colwise",
    "self_attn.to_out": "rowwise",
    "self_attn.add_q_proj": "colwise", "self_attn.add_k_proj": "colwise", "self_attn.add_v_proj": "colwise",
    "self_attn.to_add_out": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
    "mlp_moe_gen.gate_proj": "colwise", "mlp_moe_gen.up_proj": "colwise", "mlp_moe_gen.down_proj": "rowwise",
}


@register_tp_plan("Cosmos3OmniTransformer")
def cosmos3_tp_plan(model) -> TensorParallelPlan:
    if not len(model.layers):
        raise UnsupportedError(f"{type(model).__name__} has no decoder layers to parallelize.")
    linears = present(model, _LAYER, "layers")
    linears["embed_tokens"] = GATHER
    linears["lm_head"] = "colwise"
    return TensorParallelPlan(linears=linears,
                              attention_attrs={"layers.*.self_attn": ("num_attention_heads", "num_key_value_heads")})
