"""Workers of tests/test_head_sharded_norms.py: norms over all heads whose features some ranks share (key/value heads
replicated when the tensor-parallel degree exceeds them), as layers on their own and inside a tiny GQA attention
sharded through the planner and the engine."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from diffpar.engines.tensor_parallel import shard_module
from diffpar.engines.tensor_parallel_linear import HeadShardedLayerNorm, HeadShardedRMSNorm
from diffpar.engines.tp_shard import COLWISE, LAYER_NORM, RMS_NORM, ROWWISE, EvenSplitPlan, NormShard, even_shard_plan
from diffpar.handle import ParallelHandle
from diffpar.testing.probes import SplitProbe
from workers.text_encoders import _counted_all_reduces


def _seeded_norm(kind: str, width: int, g: torch.Generator) -> nn.Module:
    """An RMSNorm or LayerNorm with random affine parameters (a shard's wrong slice of them would show)."""
    norm = nn.LayerNorm(width, eps=1e-5) if kind == LAYER_NORM else nn.RMSNorm(width, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=g))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn(width, generator=g))
    return norm


def norm_pieces(kind: str, width: int, ranges: list, offset: float = 1.5):
    """Every rank normalizes only its features of a seeded input with its shard of a seeded norm, built from a
    hand-made NormShard; returns its piece, the whole norm's output, what it holds and counts, and the all-reduces."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)  # the same norm and input on every rank
    norm = _seeded_norm(kind, width, g)
    x = torch.randn(2, 5, width, generator=g) * 2 + offset  # a mean far from 0: a LayerNorm's sum term matters
    spec = NormShard("norm", width, tuple(tuple(tuple(r) for r in rs) for rs in ranges), kind)
    layer = HeadShardedLayerNorm if kind == LAYER_NORM else HeadShardedRMSNorm
    shard = layer.from_norm(norm, spec, rank, dist.group.WORLD)
    local_x = torch.cat([x[..., a:b] for a, b in spec.ranges[rank]], dim=-1)
    with _counted_all_reduces() as calls, torch.no_grad():
        piece = shard(local_x)
    with torch.no_grad():
        full = norm(x)
    counted = shard.counted if shard.counted is not None else ((0, local_x.shape[-1]),)
    return {"piece": piece, "full": full, "input_width": local_x.shape[-1], "weight": tuple(shard.weight.shape),
            "bias": tuple(shard.bias.shape) if getattr(shard, "bias", None) is not None else None,
            "counted": sum(b - a for a, b in counted), "all_reduces": calls}


class TinyGQAttention(nn.Module):
    """Grouped-query self-attention with norms over all heads of the queries and of the keys (as Wan's and
    Lumina's "across heads" norms), laid out like diffusers' `Attention` for the planner: `heads`, `inner_dim`,
    `inner_kv_dim`, and a `processor` attribute (what SplitProbe watches)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, norm: str, g: torch.Generator):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.inner_dim, self.inner_kv_dim = heads * head_dim, kv_heads * head_dim
        self.processor = None
        self.to_q = nn.Linear(dim, self.inner_dim)
        self.to_k = nn.Linear(dim, self.inner_kv_dim)
        self.to_v = nn.Linear(dim, self.inner_kv_dim)
        self.to_out = nn.Linear(self.inner_dim, dim)
        self.norm_q = _seeded_norm(norm, self.inner_dim, g)
        self.norm_k = _seeded_norm(norm, self.inner_kv_dim, g)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        q = self.norm_q(self.to_q(hidden_states)).view(b, s, self.heads, -1).transpose(1, 2)
        k = self.norm_k(self.to_k(hidden_states)).view(b, s, self.kv_heads, -1).transpose(1, 2)
        v = self.to_v(hidden_states).view(b, s, self.kv_heads, -1).transpose(1, 2)
        groups = self.heads // self.kv_heads  # query heads per key/value head (per rank once sharded)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, s, -1))


class TinyGQAModel(nn.Module):
    def __init__(self, norm: str, kv_heads: int, heads: int = 4, head_dim: int = 4, dim: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)  # the same weights on every rank
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.attn = TinyGQAttention(dim, heads, kv_heads, head_dim, norm, g)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.attn(hidden_states)


TINY_GQA_PLAN = EvenSplitPlan(
    linears={"attn.to_q": COLWISE, "attn.to_k": COLWISE, "attn.to_v": COLWISE, "attn.to_out": ROWWISE},
    attention_attrs={"attn": ("heads", "kv_heads")},
    sharded_norms=("attn.norm_q", "attn.norm_k"),
)


def gqa_attention(norm: str, kv_heads: int):
    """The tiny GQA attention in one process, then sharded over the world by the planner and the engine: outputs,
    the key norm's piece against the whole key norm, what each rank's key norm holds and counts, SplitProbe
    summaries, and whether detach gave the whole weights back."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = TinyGQAModel(norm, kv_heads)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), SplitProbe(model) as reference_probe:
        reference = model(x)
    with torch.no_grad():
        whole_keys = model.attn.norm_k(model.attn.to_k(x))
    plan = even_shard_plan(model, TINY_GQA_PLAN, world, source="test", origin="tests/workers/head_sharded_norms.py")
    norm_spec = next(n for n in plan.norms if n.path == "attn.norm_k")
    handle = ParallelHandle(model)
    try:
        shard_module(model, plan, dist.group.WORLD, handle, "tiny GQA attention", detach="gather")
        handle.commit()
        attn = model.attn
        with torch.no_grad(), SplitProbe(model) as probe:
            out = model(x)
        with torch.no_grad():
            keys = attn.norm_k(attn.to_k(x))
        key_norm = attn.norm_k
        counted = key_norm.counted if key_norm.counted is not None else ((0, key_norm.weight.shape[0]),)
        result = {
            "rank": rank,
            "out": out, "reference": reference,
            "keys": keys, "whole_keys_mine": torch.cat([whole_keys[..., a:b] for a, b in key_norm.ranges], dim=-1),
            "norm_types": (type(attn.norm_q).__name__, type(key_norm).__name__),
            "plan_kind": norm_spec.kind, "key_width": norm_spec.width,
            "key_held": key_norm.weight.shape[0], "key_counted": sum(b - a for a, b in counted),
            "heads": (attn.heads, attn.kv_heads), "q_held": attn.to_q.weight.shape[0],
            "split": probe.summary(), "split_reference": reference_probe.summary(),
        }
    finally:
        handle.detach()  # all ranks together: the shards are gathered back into the original layers
    result["restored"] = all(torch.equal(model.state_dict()[k], v) for k, v in whole.items())
    return result
