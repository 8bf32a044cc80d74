"""The context-parallel process group behind a diffusers `ParallelConfig`, for processors that exchange something
other than attention inputs (e.g. a linear attention's key-value summaries, a convolution's halo rows).

diffusers' split hooks deal token shards over the flattened (ring x ulysses) mesh in the order of the ranks of its
group (`dist.get_rank(mesh.get_group())`), on every release 0.36-0.42.1; that mesh is a private attribute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class TokenShards:
    """Where this rank's token shard sits: `group` (every context-parallel rank), `rank` (the shard's index),
    `size` (the number of shards)."""

    group: object
    rank: int
    size: int


def token_shards(parallel_config) -> TokenShards:
    mesh = parallel_config.context_parallel_config._flattened_mesh
    group = mesh.get_group()
    return TokenShards(group=group, rank=dist.get_rank(group), size=mesh.size())
