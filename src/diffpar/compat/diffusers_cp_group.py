"""The context-parallel process group behind a diffusers `ParallelConfig`, for processors that exchange something
other than attention inputs (e.g. a linear attention's key-value summaries, a convolution's halo rows).

diffusers' split hooks deal token shards over the flattened (ring x ulysses) mesh in the order of the ranks of its
group (`dist.get_rank(mesh.get_group())`), on every release 0.36-0.42.1; that mesh is a private attribute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffpar.errors import UnsupportedError


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


def shard_rows(x: torch.Tensor, local: int, parallel_config, label: str, dim: int = 0) -> torch.Tensor:
    """This rank's `local` rows of `x` (a per-token table, whole along `dim`), as diffusers' split hooks dealt the
    tokens: in order of the context-parallel group's ranks, `tensor_split` sizes (equal where the degree divides
    the length). `label` names the model in the refusal where the shard this rank holds is not that one."""
    whole = x.shape[dim]
    if whole == local or parallel_config is None:
        return x
    shards = token_shards(parallel_config)
    sizes = [len(part) for part in torch.arange(whole).tensor_split(shards.size)]
    if sizes[shards.rank] != local:
        raise UnsupportedError(
            f"{label}: this rank holds {local} of {whole} frames, but diffusers' split gives it "
            f"{sizes[shards.rank]}; the frame RoPE table and mask cannot be matched to its shard."
        )
    return x.narrow(dim, sum(sizes[:shards.rank]), local)
