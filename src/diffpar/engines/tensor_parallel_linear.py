"""Column- and row-parallel linear layers on plain tensors, the collectives they need, and head-sharded norms
(RMSNorm and LayerNorm over all heads, their statistics all-reduced).

A tensor-parallel pair splits one inner dimension over the ranks of a process group:

    x --ColumnParallelLinear--> this rank's slice of the features --(elementwise / per-head work)-->
      --RowParallelLinear--> partial sums --all-reduce--> + bias --> the full output, the same on every rank

The column layer needs no communication; the row layer does one all-reduce. Weights are plain tensors (no
DTensor): each rank keeps only the rows / columns it owns, sliced once from the full layer, which the caller
then drops. Slices are ranges of the full dimension and may differ in size between ranks (uneven splits).
The process group is always an argument; nothing here reads a global default.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from diffpar.mesh import settle_deferred
import torch.nn.functional as F
from torch import nn

from diffpar.compat.quantized_tensors import cut_ranges
from diffpar.engines.tp_shard import NormShard, Range, total as _total


def _slice_rows(weight: torch.Tensor, ranges: Sequence[Range]) -> torch.Tensor:
    # A contiguous copy of its own storage, so the full tensor can be freed; quantized weights (known torchao
    # layouts) are cut through their data and scales, never re-quantized (compat/quantized_tensors.py).
    return cut_ranges(weight, 0, ranges)


def _slice_cols(weight: torch.Tensor, ranges: Sequence[Range]) -> torch.Tensor:
    return cut_ranges(weight, 1, ranges)


# -- collectives -----------------------------------------------------------------------------------------------
def all_reduce_sum(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum `tensor` over `group`. In place (and returned) for inference; autograd-aware when it needs a grad."""
    settle_deferred()  # a pipeline call's agreement, if still in flight: before any collective of the call
    if torch.is_grad_enabled() and tensor.requires_grad:
        import torch.distributed.nn.functional as dist_fn

        return dist_fn.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_gather_last_dim(tensor: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Concatenate every rank's `tensor` along the last dimension; rank i holds `sizes[i]` features.

    Pieces are padded to the largest size first: gloo's all_gather needs equal shapes.
    """
    width = max(sizes)
    local = tensor
    if tensor.shape[-1] < width:
        local = F.pad(tensor, (0, width - tensor.shape[-1]))
    local = local.contiguous()
    pieces = [torch.empty_like(local) for _ in sizes]
    settle_deferred()
    dist.all_gather(pieces, local, group=group)
    return torch.cat([p[..., :n] for p, n in zip(pieces, sizes)], dim=-1)


class ShardedModuleDetachedError(RuntimeError):
    pass


_DETACHED_MESSAGE = (
    "{label} holds only this rank's shard of a layer that diffpar split over {world} processes, and diffpar was "
    "detached: it cannot compute the full layer any more. Reload the module (e.g. `from_pretrained`) before "
    "using it again, or pass keep_original_text_encoders=True to restore it on detach."
)


# -- layers ----------------------------------------------------------------------------------------------------
class ColumnParallelLinear(nn.Module):
    """This rank's output features of a linear layer: y[..., mine] = x @ W[mine].T + b[mine].

    `gather_output=False` (the usual case) leaves the output split: the next layer works on this rank's
    features (heads, MLP channels). `gather_output=True` all-gathers the full output.
    """

    def __init__(self, in_features: int, out_ranges: Sequence[Range], full_out_features: int, *, bias: bool,
                 group, gather_output: bool = False, all_out_sizes: Sequence[int] | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_ranges = tuple(tuple(r) for r in out_ranges)
        self.out_features = _total(self.out_ranges)
        self.full_out_features = full_out_features
        self.group = group
        self.gather_output = gather_output
        self.all_out_sizes = tuple(all_out_sizes) if all_out_sizes is not None else None
        if gather_output and self.all_out_sizes is None:
            raise ValueError("gather_output=True needs all_out_sizes (every rank's number of output features).")
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype)) if bias else None
        self.detached_reason: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_ranges: Sequence[Range], group, *, gather_output: bool = False,
                    all_out_sizes: Sequence[int] | None = None) -> "ColumnParallelLinear":
        layer = cls(linear.in_features, out_ranges, linear.out_features, bias=linear.bias is not None, group=group,
                    gather_output=gather_output, all_out_sizes=all_out_sizes, device="meta")
        layer.weight = nn.Parameter(_slice_rows(linear.weight.data, out_ranges), linear.weight.requires_grad)
        if linear.bias is not None:
            layer.bias = nn.Parameter(_slice_rows(linear.bias.data, out_ranges), linear.bias.requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detached_reason is not None:
            raise ShardedModuleDetachedError(self.detached_reason)
        y = F.linear(x, self.weight, self.bias)
        if self.gather_output:
            y = all_gather_last_dim(y, self.all_out_sizes, self.group)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} of {self.full_out_features} "
                f"{list(self.out_ranges)}, bias={self.bias is not None}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """This rank's input features of a linear layer: partial = x[..., mine] @ W[:, mine].T, summed over ranks.

    `input_is_parallel=True`: the input already holds only this rank's features (the output of a
    ColumnParallelLinear); otherwise the full input is sliced here. `reduce_results=True`: one all-reduce, then
    the bias, added once, so every rank returns the full output. `reduce_results=False` returns the partial sum
    without the bias, for a caller that fuses the reduction.
    """

    def __init__(self, in_ranges: Sequence[Range], full_in_features: int, out_features: int, *, bias: bool, group,
                 input_is_parallel: bool = True, reduce_results: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_ranges = tuple(tuple(r) for r in in_ranges)
        self.in_features = _total(self.in_ranges)
        self.full_in_features = full_in_features
        self.out_features = out_features
        self.group = group
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.detached_reason: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, in_ranges: Sequence[Range], group, *, input_is_parallel: bool = True,
                    reduce_results: bool = True) -> "RowParallelLinear":
        layer = cls(in_ranges, linear.in_features, linear.out_features, bias=linear.bias is not None, group=group,
                    input_is_parallel=input_is_parallel, reduce_results=reduce_results, device="meta")
        layer.weight = nn.Parameter(_slice_cols(linear.weight.data, in_ranges), linear.weight.requires_grad)
        if linear.bias is not None:
            # The bias is not split: it is added once, after the sum.
            layer.bias = nn.Parameter(linear.bias.data.clone(), linear.bias.requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detached_reason is not None:
            raise ShardedModuleDetachedError(self.detached_reason)
        if not self.input_is_parallel:
            parts = [x[..., a:b] for a, b in self.in_ranges]
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        y = F.linear(x, self.weight)
        if not self.reduce_results:
            return y
        y = all_reduce_sum(y, self.group)
        if self.bias is not None:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} of {self.full_in_features} {list(self.in_ranges)}, "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, reduce_results={self.reduce_results}")


class HeadParallelEmbedding(nn.Module):
    """A table keeping this rank's columns only: a table whose columns are attention heads (T5's relative-position
    bias, Embedding(buckets, heads)), where a lookup needs no communication; or (`gather_output`) an embedding
    split along its width (DiT's class labels), whose looked-up rows are all-gathered back to the full width."""

    def __init__(self, num_embeddings: int, head_ranges: Sequence[Range], full_heads: int, *, device=None, dtype=None,
                 group=None, all_sizes: Sequence[int] | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.head_ranges = tuple(tuple(r) for r in head_ranges)
        self.embedding_dim = _total(self.head_ranges)
        self.full_embedding_dim = full_heads
        self.group = group
        self.all_sizes = tuple(all_sizes) if all_sizes is not None else None  # set: gather the output
        self.weight = nn.Parameter(torch.empty(num_embeddings, self.embedding_dim, device=device, dtype=dtype))
        self.detached_reason: str | None = None

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, head_ranges: Sequence[Range], *, group=None,
                       all_sizes: Sequence[int] | None = None) -> "HeadParallelEmbedding":
        layer = cls(embedding.num_embeddings, head_ranges, embedding.embedding_dim, device="meta", group=group,
                    all_sizes=all_sizes)
        layer.weight = nn.Parameter(_slice_cols(embedding.weight.data, head_ranges), embedding.weight.requires_grad)
        return layer

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if self.detached_reason is not None:
            raise ShardedModuleDetachedError(self.detached_reason)
        out = F.embedding(indices, self.weight)
        if self.all_sizes is not None:
            out = all_gather_last_dim(out, self.all_sizes, self.group)
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} of {self.full_embedding_dim} columns "
                f"{list(self.head_ranges)}, gather_output={self.all_sizes is not None}")


class ChannelParallelConv2d(nn.Module):
    """This rank's channels of a Conv2d, channels in dim 1 of a (B, C, H, W) input:
    - "column": a 1x1 convolution keeping the output channels `ranges` (a ColumnParallelLinear over channels);
      with `all_out_sizes` (every rank's number of output channels) the full output is all-gathered along them;
    - "row": a 1x1 convolution keeping the input channels `ranges`: partial sums, one all-reduce, bias added once;
    - "depthwise": a depthwise convolution (groups == channels) keeping the channels `ranges`, in and out alike:
      each channel only reads itself, so no communication.
    """

    def __init__(self, conv: nn.Conv2d, mode: str, ranges: Sequence[Range], group,
                 all_out_sizes: Sequence[int] | None = None):
        super().__init__()
        if mode not in ("column", "row", "depthwise"):
            raise ValueError(f"mode must be column, row or depthwise, got {mode!r}")
        if all_out_sizes is not None and mode != "column":
            raise ValueError("all_out_sizes (a gathered output) is for column mode only")
        self.mode = mode
        self.all_out_sizes = tuple(all_out_sizes) if all_out_sizes is not None else None
        self.ranges = tuple(tuple(r) for r in ranges)
        self.group = group
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.full_in_channels, self.full_out_channels = conv.in_channels, conv.out_channels
        slice_ = _slice_cols if mode == "row" else _slice_rows
        self.weight = nn.Parameter(slice_(conv.weight.data, self.ranges), conv.weight.requires_grad)
        self.bias = None
        if conv.bias is not None:
            bias = conv.bias.data.clone() if mode == "row" else _slice_rows(conv.bias.data, self.ranges)
            self.bias = nn.Parameter(bias, conv.bias.requires_grad)
        self.groups = _total(self.ranges) if mode == "depthwise" else 1
        self.detached_reason: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detached_reason is not None:
            raise ShardedModuleDetachedError(self.detached_reason)
        if self.mode != "row":
            y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
            if self.all_out_sizes is None:
                return y
            # channels last for the gather along features, then back to (B, C, H, W)
            return all_gather_last_dim(y.movedim(1, -1).contiguous(), self.all_out_sizes, self.group).movedim(-1, 1)
        y = all_reduce_sum(F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation), self.group)
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"{self.mode}, channels {list(self.ranges)} of in {self.full_in_channels} / out "
                f"{self.full_out_channels}, kernel {tuple(self.weight.shape[2:])}, bias={self.bias is not None}, "
                f"gather_output={self.all_out_sizes is not None}")


def mark_detached(layer: nn.Module, label: str, world: int) -> None:
    """Make a shard refuse to run (a clear error, not a wrong result or a hang) once diffpar is detached."""
    layer.detached_reason = _DETACHED_MESSAGE.format(label=label, world=world)


def counted_features(spec: NormShard, rank: int) -> tuple[Range, ...] | None:
    """`spec.counted(rank)` (this rank's features no lower rank holds, in local coordinates), or None where that is
    every feature this rank holds: the usual case, where the statistics take the local input as it is."""
    counted = spec.counted(rank)
    return None if counted == ((0, _total(spec.ranges[rank])),) else counted


class _HeadShardedNorm(nn.Module):
    """What the norms over all heads share, on a rank holding some of the heads: this rank's features of the
    weight (and bias), and per-token sums over the whole width from one all-reduce of per-rank sums.

    Features several ranks hold (a key/value head replicated on the ranks that share it, when the tensor-parallel
    degree exceeds the key/value heads) enter the sums from the lowest of those ranks only (`NormShard.counted`):
    counted on every rank holding them, they would weigh more than the others and the statistics would be wrong.
    So the all-reduced sums are those of the whole tensor, divided by the whole width."""

    def __init__(self, spec: NormShard, rank: int, eps: float | None, group):
        super().__init__()
        self.full_width = spec.width
        self.ranges = tuple(tuple(r) for r in spec.ranges[rank])
        self.counted = counted_features(spec, rank)  # None: every local feature counts
        self.eps = eps
        self.group = group

    def _slice_parameter(self, norm: nn.Module, key: str) -> None:
        full = getattr(norm, key, None)
        # A copy of this rank's features: the original keeps the full tensor until commit, then is released.
        setattr(self, key, None if full is None else
                nn.Parameter(_slice_rows(full.data, self.ranges), requires_grad=full.requires_grad))

    def group_sums(self, xf: torch.Tensor, powers: Sequence[int]) -> torch.Tensor:
        """Per token, for each power p, the sum of xf ** p over the whole width (stacked along a new first dim):
        this rank's counted features summed, then all-reduced over the group, one collective for all powers."""
        if self.counted is None:
            counted = xf
        elif not self.counted:  # every feature this rank holds is counted by a lower rank: it adds zeros
            counted = xf.new_zeros(xf.shape[:-1] + (0,))
        else:
            parts = [xf[..., a:b] for a, b in self.counted]
            counted = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        stats = torch.stack([counted.sum(dim=-1) if p == 1 else counted.pow(p).sum(dim=-1) for p in powers])
        settle_deferred()
        dist.all_reduce(stats, group=self.group)
        return stats

    def extra_repr(self) -> str:
        counted = "" if self.counted is None else f", counted {list(self.counted)}"
        return f"{_total(self.ranges)} of {self.full_width} features {list(self.ranges)}{counted}, eps={self.eps}"


class HeadShardedRMSNorm(_HeadShardedNorm):
    """An RMSNorm over all heads (Wan's "rms_norm_across_heads") on a rank holding some of them: this rank's
    features of the weight, and the mean of squares over the whole width (see `_HeadShardedNorm`)."""

    def __init__(self, spec: NormShard, rank: int, eps: float | None, group, *, device=None, dtype=None,
                 elementwise_affine: bool = True):
        super().__init__(spec, rank, eps, group)
        self.weight = nn.Parameter(torch.empty(_total(self.ranges), device=device, dtype=dtype),
                                   requires_grad=False) if elementwise_affine else None

    @classmethod
    def from_norm(cls, norm: nn.Module, spec: NormShard, rank: int, group) -> "HeadShardedRMSNorm":
        weight = getattr(norm, "weight", None)
        layer = cls(spec, rank, getattr(norm, "eps", None), group, device="meta",
                    elementwise_affine=weight is not None)
        layer._slice_parameter(norm, "weight")
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = self.group_sums(xf, (2,))[0].unsqueeze(-1)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        out = (xf * torch.rsqrt(sum_sq / self.full_width + eps)).to(x.dtype)
        return out * self.weight if self.weight is not None else out


class HeadShardedLayerNorm(_HeadShardedNorm):
    """A LayerNorm over all heads (Lumina's "layer_norm_across_heads") on a rank holding some of them: this rank's
    features of the weight and bias; the mean and variance over the whole width come from one all-reduce of
    [sum, sum of squares] per token (see `_HeadShardedNorm`)."""

    def __init__(self, spec: NormShard, rank: int, eps: float, group):
        super().__init__(spec, rank, eps, group)
        self.weight = None
        self.bias = None

    @classmethod
    def from_norm(cls, norm: nn.LayerNorm, spec: NormShard, rank: int, group) -> "HeadShardedLayerNorm":
        layer = cls(spec, rank, norm.eps, group)
        layer._slice_parameter(norm, "weight")
        layer._slice_parameter(norm, "bias")
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        stats = self.group_sums(xf, (1, 2))
        mean = stats[0] / self.full_width
        var = (stats[1] / self.full_width - mean.pow(2)).clamp_min(0)
        out = (xf - mean.unsqueeze(-1)) * torch.rsqrt(var.unsqueeze(-1) + self.eps)
        if self.weight is not None:
            out = out * self.weight.float()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)


class ReducedOutputModule(nn.Module):
    """A module keeping a slice of its own parameters along a hidden width it contracts (packed SwiGLU experts: the
    gate/up columns and down rows of this rank's part of the hidden width), so its output is a partial sum:
    all-reduced over the group. `inner` is a shallow copy of the original module with the sliced parameters (the
    original stays untouched for the undo)."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner = inner
        self.group = group

    @classmethod
    def from_module(cls, module: nn.Module, params, rank: int, attributes: dict, group) -> "ReducedOutputModule":
        import copy

        inner = copy.copy(module)
        inner._parameters = dict(module._parameters)  # own dict: the original keeps its full parameters
        inner.__dict__.update(attributes)
        with torch.no_grad():
            for name, dim, ranges in params:
                full = getattr(module, name)
                inner._parameters[name] = nn.Parameter(cut_ranges(full.data, dim, ranges[rank]),
                                                       requires_grad=full.requires_grad)
        return cls(inner, group)

    def forward(self, *args, **kwargs):
        reason = getattr(self, "detached_reason", None)
        if reason:
            raise ShardedModuleDetachedError(reason)
        return all_reduce_sum(self.inner(*args, **kwargs), self.group)

    def extra_repr(self) -> str:
        return f"output all-reduced; {', '.join(f'{n}={tuple(p.shape)}' for n, p in self.inner._parameters.items())}"


_GATHERABLE = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
               torch.int8, torch.uint8, torch.bool)


def gather_full(local: torch.Tensor, dim: int, all_ranges: Sequence[Sequence[Range]], full_size: int,
                group) -> torch.Tensor:
    """The full tensor back from every rank's `local` piece along `dim` (a collective over `group`): rank r's
    piece holds the features `all_ranges[r]`, concatenated. Bit for bit the tensor the pieces were cut from."""
    if local.dtype not in _GATHERABLE and local.element_size() == 1:
        # float8 data of a quantized weight: gloo has no float8 type; moving bytes, not values, is exact anyway
        return gather_full(local.view(torch.uint8), dim, all_ranges, full_size, group).view(local.dtype)
    sizes = [_total(r) for r in all_ranges]
    width = max(sizes)
    piece = local.movedim(dim, 0).contiguous()
    if piece.shape[0] < width:
        piece = torch.cat([piece, piece.new_zeros((width - piece.shape[0], *piece.shape[1:]))])
    pieces = [torch.empty_like(piece) for _ in sizes]
    settle_deferred()
    dist.all_gather(pieces, piece, group=group)
    full = piece.new_empty((full_size, *piece.shape[1:]))
    for ranges, got in zip(all_ranges, pieces):
        offset = 0
        for a, b in ranges:
            full[a:b] = got[offset:offset + b - a]
            offset += b - a
    return full.movedim(0, dim).contiguous()


PARALLEL_LAYER_TYPES = (ColumnParallelLinear, RowParallelLinear, HeadParallelEmbedding, HeadShardedRMSNorm,
                        HeadShardedLayerNorm, ChannelParallelConv2d, ReducedOutputModule)
