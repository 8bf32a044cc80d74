"""Row-split tensors: halo exchange, whole-image statistics and gathering, for split VAE decode/encode.

An activation of shape (B, C, [T,] H, W) is split by rows (dim -2) across the ranks of a group, rank r holding a
contiguous band; bands may differ in height. Every operation that mixes rows is made exact here:

- a convolution needs the rows its kernel reaches across a band edge ("halo"): `RowSplit.exchange` fetches exactly
  those rows from the two neighbours (point to point, nothing else moves), and `conv_native_with_halo` /
  `conv_with_halo` compute the same output rows the whole-image convolution would, padding only at the image edges;
- a normalization whose statistics cover the image (GroupNorm) reduces them over all bands (`group_norm_whole_image`:
  per-band mean and centred sum of squares in fp32, merged with Chan's formula, so bf16 inputs are safe);
- attention needs every key: `RowSplit.gather` assembles whole rows on every rank.

Row-local operations (pointwise activations, per-pixel channel norms, nearest up-sampling by an integer factor,
1x1 convolutions, space-to-depth with band heights aligned to the factor) need nothing. Band heights at every
level come from one split of the input, aligned so that strided layers start each band on a stride boundary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from diffpar.engines.tp_shard import even_split  # the one splitter: sizes differ by at most one

ROW_DIM = -2


def row_sizes(height: int, world: int, unit: int = 1) -> list[int]:
    """Band heights for `height` rows: whole units of `unit` rows dealt evenly, the remainder to the last band.

    `unit` is the total stride of the network (an encoder's down-sampling factor) so every band but the last starts
    and ends on a stride boundary at every level.
    """
    units = height // unit
    sizes = [s * unit for s in even_split(units, world)]
    sizes[-1] += height - units * unit
    return sizes


@dataclass
class ExchangeStats:
    """What one rank sent, by kind, in bytes, and how many communication calls it made."""

    halo_bytes: int = 0
    norm_bytes: int = 0
    gather_bytes: int = 0
    calls: int = 0
    halo_calls: int = 0
    norm_calls: int = 0
    gather_calls: int = 0

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class RowSplit:
    """This rank's place in a row split: who its neighbours are, and the collectives over the group."""

    group: object
    rank: int
    world: int
    stats: ExchangeStats = field(default_factory=ExchangeStats)

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group not in (None, dist.group.WORLD) else r

    # -- halo ------------------------------------------------------------------------------------------------
    def exchange(self, x: torch.Tensor, above: int, below: int, dim: int = ROW_DIM):
        """The `above` rows just above this band (from rank-1) and the `below` rows just below it (from rank+1).

        Each rank sends its last `above` rows down and its first `below` rows up, so all ranks must call this with
        the same `above` / `below` (they do: the same layer runs everywhere). Returns (top, bottom), None at an
        image edge or when zero rows are needed.
        """
        return self.start_exchange(x, above, below, dim).wait()

    def start_exchange(self, x: torch.Tensor, above: int, below: int, dim: int = ROW_DIM) -> "PendingHalo":
        """`exchange`, started: the transfers progress (in the backend's threads) while this rank computes."""
        h = x.shape[dim]
        if (above and h < above) or (below and h < below):
            raise RuntimeError(
                f"diffpar VAE split: a band of {h} rows is thinner than the {max(above, below)}-row halo a layer needs; "
                "the split plan should have prevented this (raise vae_split_min_rows)."
            )
        ops, top, bottom = [], None, None
        sent = 0
        if not self.first:
            if above:
                top = x.new_empty(_with_dim(x.shape, dim, above))
                ops.append(dist.P2POp(dist.irecv, top, self._global(self.rank - 1), self.group, tag=0))
            if below:
                send = x.narrow(dim, 0, below).contiguous()
                ops.append(dist.P2POp(dist.isend, send, self._global(self.rank - 1), self.group, tag=1))
                sent += send.numel() * send.element_size()
        if not self.last:
            if below:
                bottom = x.new_empty(_with_dim(x.shape, dim, below))
                ops.append(dist.P2POp(dist.irecv, bottom, self._global(self.rank + 1), self.group, tag=1))
            if above:
                send = x.narrow(dim, h - above, above).contiguous()
                ops.append(dist.P2POp(dist.isend, send, self._global(self.rank + 1), self.group, tag=0))
                sent += send.numel() * send.element_size()
        works = dist.batch_isend_irecv(ops) if ops else []
        if ops:
            self.stats.calls += 1
            self.stats.halo_calls += 1
            self.stats.halo_bytes += sent
        return PendingHalo(works, top, bottom)

    # -- gathers -----------------------------------------------------------------------------------------------
    def all_sizes(self, n: int) -> list[int]:
        mine = torch.tensor([n], dtype=torch.int64, device=collective_device(self.group))
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine, group=self.group)
        self.stats.calls += 1
        return [int(t.item()) for t in out]

    def gather(self, x: torch.Tensor, dim: int = ROW_DIM, sizes: list[int] | None = None) -> torch.Tensor:
        """Every rank's band of `x` along `dim`, concatenated in rank order, on every rank."""
        dim = dim % x.dim()
        if sizes is None:
            sizes = self.all_sizes(x.shape[dim])
        biggest = max(sizes)
        x = x.contiguous()
        if x.shape[dim] < biggest:  # gloo gathers equal shapes only
            x = torch.cat([x, x.new_zeros(_with_dim(x.shape, dim, biggest - x.shape[dim]))], dim=dim)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        self.stats.calls += 1
        self.stats.gather_calls += 1
        self.stats.gather_bytes += x.numel() * x.element_size()
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)

    def gather_small(self, t: torch.Tensor) -> torch.Tensor:
        """All ranks' copies of a small tensor, stacked on a new first dimension."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        self.stats.calls += 1
        self.stats.norm_calls += 1
        self.stats.norm_bytes += t.numel() * t.element_size()
        return torch.stack(parts)


@dataclass
class PendingHalo:
    works: list
    top: torch.Tensor | None
    bottom: torch.Tensor | None

    def wait(self):
        for work in self.works:
            work.wait()
        self.works = []
        return self.top, self.bottom


def _with_dim(shape, dim: int, size: int) -> list[int]:
    shape = list(shape)
    shape[dim] = size
    return shape


def collective_device(group) -> torch.device:
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- padding at the image edges only ---------------------------------------------------------------------------
def pad_rows_at_edges(x: torch.Tensor, pad, split: RowSplit, mode: str = "constant", value: float = 0.0):
    """`F.pad(x, pad)` for a band: the row padding (pad[2], pad[3]) exists only at the image's top and bottom."""
    pad = list(pad)
    if not split.first:
        pad[2] = 0
    if not split.last:
        pad[3] = 0
    if not any(pad):
        return x
    return F.pad(x, pad, mode=mode, value=value) if mode == "constant" else F.pad(x, pad, mode=mode)


def _kernel_extent(kernel: int, dilation: int) -> int:
    return dilation * (kernel - 1) + 1


def conv_native_with_halo(x, split: RowSplit, *, kernel: int, dilation: int, pad: int, run_padded, run_unpadded):
    """A stride-1, zero-padded convolution of a band, equal to the same rows of the whole-image convolution.

    `run_padded(x)` is the layer's own forward (zero padding `pad` rows on both sides, handled inside the kernel,
    no copy of `x`); it is right everywhere except the `pad` rows next to a neighbour, which are recomputed from
    thin slabs of halo + edge rows with `run_unpadded` (the same convolution with no row padding).
    """
    extent = _kernel_extent(kernel, dilation)
    below = extent - 1 - pad
    h = x.shape[ROW_DIM]
    if h < extent - 1:
        raise RuntimeError(
            f"diffpar VAE split: a band of {h} rows is thinner than the {extent - 1} rows a convolution reads across "
            "its edge; the split plan should have prevented this."
        )
    pending = split.start_exchange(x, above=pad, below=below)
    out = run_padded(x)  # the bulk of the work, while the halo rows travel
    top, bottom = pending.wait()
    if top is not None:
        slab = torch.cat([top, x.narrow(ROW_DIM, 0, extent - 1)], dim=ROW_DIM)
        out.narrow(ROW_DIM, 0, pad).copy_(run_unpadded(slab))
    if bottom is not None:
        slab = torch.cat([x.narrow(ROW_DIM, h - (extent - 1), extent - 1), bottom], dim=ROW_DIM)
        out.narrow(ROW_DIM, h - below, below).copy_(run_unpadded(slab))
    return out


def conv_with_halo(x, split: RowSplit, *, kernel: int, dilation: int, stride: int, pad_top: int, pad_bottom: int,
                   pad, run):
    """Any convolution of a band (strided, replicate-padded, pre-padded causal convs), exactly.

    `pad(t, top, bottom)` applies the layer's own padding to `t` with `top` / `bottom` rows in H (and its usual
    padding in the other dims); `run(t)` convolves with no row padding. Rows next to a neighbour are overwritten
    with the neighbour's rows, padded the same way in the other dims. Every band but the last starts on a stride
    boundary (see `row_sizes`), so each band yields exactly the output rows whose windows start inside it.
    """
    extent = _kernel_extent(kernel, dilation)
    h = x.shape[ROW_DIM]
    if not split.last and h % stride:
        raise RuntimeError(
            f"diffpar VAE split: a band of {h} rows feeds a stride-{stride} layer; bands must be multiples of the "
            "stride. This is a bug in the split plan."
        )
    below = max(0, extent - stride - pad_top)
    pending = split.start_exchange(x, above=pad_top, below=below)
    local_bottom = pad_bottom if split.last else below
    xp = pad(x, pad_top, local_bottom)
    top, bottom = pending.wait()
    if top is not None:
        xp.narrow(ROW_DIM, 0, pad_top).copy_(pad(top, 0, 0))
    if bottom is not None:
        xp.narrow(ROW_DIM, pad_top + h, below).copy_(pad(bottom, 0, 0))
    out = run(xp)
    expected = h // stride if not split.last else (pad_top + h + pad_bottom - extent) // stride + 1
    if out.shape[ROW_DIM] > expected:
        out = out.narrow(ROW_DIM, 0, expected)
    return out


# -- whole-image GroupNorm -------------------------------------------------------------------------------------
def _sum_of_squares(rows: torch.Tensor, chunk_elements: int = 1 << 20) -> torch.Tensor:
    """Per-row sum of squares in fp64, from fp32 cascade sums over cache-sized chunks of rows (no big temporary;
    torch.linalg.vector_norm is ~100x less accurate here)."""
    step = max(1, chunk_elements // max(1, rows.shape[-1]))
    return torch.cat([(c * c).sum(dim=-1, dtype=torch.float64) if c.dtype == torch.float64 else (c * c).sum(dim=-1).double()
                      for c in rows.split(step)])


def group_norm_whole_image(x: torch.Tensor, split: RowSplit, num_groups: int, weight, bias, eps: float):
    """`F.group_norm(x, ...)` of the whole image, given this rank's band.

    Each band contributes (count, mean, centred sum of squares) per (sample, group), accumulated in fp32 at least
    (bf16 inputs are upcast); the parts are merged in fp64 with Chan's parallel formula, so no sum of squares is
    ever subtracted from another (no cancellation). The output is computed like PyTorch's kernel does,
    x * (rstd * gamma) + (beta - mean * rstd * gamma), in a buffer that first holds x - band mean, updated in place
    (one allocation, as the native op).
    """
    batch, channels = x.shape[:2]
    per_group = channels // num_groups
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.contiguous().view(batch * num_groups, -1)
    count = rows.shape[-1]
    band_mean = rows.mean(dim=-1, keepdim=True, dtype=acc)
    centred = torch.sub(rows if rows.dtype == acc else rows.to(acc), band_mean)
    band_m2 = _sum_of_squares(centred)
    local = torch.stack([band_mean.view(-1).double(), band_m2, torch.full_like(band_m2, count)])
    parts = split.gather_small(local)  # (world, 3, B*G)
    counts = parts[:, 2]
    total = counts.sum(0)
    mean_all = (parts[:, 0] * counts).sum(0) / total
    m2_all = (parts[:, 1] + counts * (parts[:, 0] - mean_all) ** 2).sum(0)
    rstd = torch.rsqrt(m2_all / total + eps)
    # centred holds x - band_mean: y = (centred + band_mean - mean) * rstd * gamma + beta.
    scale = rstd.repeat_interleave(per_group)
    shift = (band_mean.view(-1).double() - mean_all).repeat_interleave(per_group) * scale
    if weight is not None:
        gamma = weight.double().repeat(batch)
        scale = scale * gamma
        shift = shift * gamma
    if bias is not None:
        shift = shift + bias.double().repeat(batch)
    out = centred.view(batch * channels, -1)
    out.mul_(scale.to(acc).unsqueeze(1)).add_(shift.to(acc).unsqueeze(1))
    return out.view(x.shape).to(x.dtype)
