"""Workers of tests/test_lumina_next_tp.py: a LayerNorm over all heads sharded over the ranks."""
from __future__ import annotations

import torch
import torch.distributed as dist

from diffpar.engines.tensor_parallel_linear import HeadShardedLayerNorm
from diffpar.engines.tp_shard import LAYER_NORM, NormShard
from workers.text_encoders import _counted_all_reduces


def layer_norm_pieces(width: int, ranges: list, offset: float = 3.0):
    """Every rank gets only its features of the input and normalizes them with its shard of a seeded LayerNorm
    (weight and bias random); returns its piece of the output, the whole LayerNorm's output, the sizes it holds
    and the all-reduces one call issued."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)  # the same norm and input on every rank
    norm = torch.nn.LayerNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=g))
        norm.bias.copy_(torch.randn(width, generator=g))
    x = torch.randn(2, 5, width, generator=g) * 2 + offset  # a mean far from 0: the sum term matters
    spec = NormShard("norm", width, tuple(tuple(tuple(r) for r in rs) for rs in ranges), LAYER_NORM)
    shard = HeadShardedLayerNorm.from_norm(norm, spec, rank, dist.group.WORLD)
    local_x = torch.cat([x[..., a:b] for a, b in spec.ranges[rank]], dim=-1)
    with _counted_all_reduces() as calls, torch.no_grad():
        piece = shard(local_x)
    with torch.no_grad():
        full = norm(x)
    return {"piece": piece, "full": full, "input_width": local_x.shape[-1],
            "weight": tuple(shard.weight.shape), "bias": tuple(shard.bias.shape), "all_reduces": calls}
