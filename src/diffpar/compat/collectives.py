"""The per-call agreement's exchange, issued straight on the process group.

The table every rank needs (each rank's row of a few integers and its random states) is gathered by a sum
all-reduce: each rank writes its row into its own slot of a zeroed table, so the sum is every row in rank order,
exactly. Issued on the group's own method (`ProcessGroup.allreduce`, on every torch release diffpar supports), not
through `dist.all_reduce` (Python argument checks and group lookups on every pipeline call's critical path).
Measured on 2 gloo CPU ranks with the caches cold (benchmarks/profile_call_agreement.py and docs/benchmarks.md):
issuing an all-gather through `dist.all_gather_into_tensor` cost 250 us, through the group's `_allgather_base`
148-191 us, and the group's `allreduce` of the same table 30-40 us less than `_allgather_base` (gloo's all-gather
splits its output into a tensor per rank on the calling thread; the all-reduce does not)."""
from __future__ import annotations

import torch.distributed as dist

# Which ProcessGroup method issues the exchange (test probes count it); None: only the Python function exists.
EXCHANGE_METHOD = "allreduce" if hasattr(dist.ProcessGroup, "allreduce") else None


def issue_all_reduce_sum(tensor, group):
    """Issue a sum all-reduce of `tensor` in place on `group` (None: the default group), not waited for; returns
    the work handle. `group` must hold this rank (the agreement's does)."""
    if group is None:
        group = dist.group.WORLD
    if EXCHANGE_METHOD is None:
        return dist.all_reduce(tensor, group=group, async_op=True)
    return group.allreduce([tensor])
