"""Transformer tensor parallelism (`tp_size`).

Two engines, one layout. Each rank keeps whole attention heads and a slice of every MLP: q/k/v and MLP-in
projections are split by output features ("colwise"), attention-out and MLP-out by input features ("rowwise",
followed by one all-reduce). Between blocks every rank holds the whole hidden state, so norms, modulation,
embeddings and the output projection stay replicated.

- "diffusers": the class's `_tp_plan` applied by diffusers' own `apply_tensor_parallel` (DTensor), where the
  installed release has both (0.40+: Flux, Flux2, QwenImage, QwenImage21).
- "diffpar": our plans (adapters/tp_plans.py) on plain tensors: the Linear keeps its identity, its parameters are
  replaced by this rank's slice, and a rowwise Linear gets a forward hook that all-reduces and adds the bias once.
  Attention modules get per-rank head counts; RMSNorms over all heads get an all-reduced mean of squares.

Checks (head counts, widths, offloading) are local and raise on every rank before any collective. Detach gathers
the slices back into the full weights (a collective: every rank must detach), bit for bit what was there when the
weights were identical on every rank, which tensor parallelism needs anyway.

With ulysses_size / ring_size as well (hybrid), context-parallel hooks are applied first on the ("ring",
"ulysses") sub-mesh and these on the "tp" sub-mesh: diffusers forbids both in one ParallelConfig, so they are two
configs on one model. Ulysses then spreads each rank's local heads, so heads / tp_size must divide by ulysses_size.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from diffpar.families.transformers import tp_plans
from diffpar.families.transformers.tp_plans import Packed, TensorParallelPlan
from diffpar.compat import diffusers_tp
from diffpar.errors import UnsupportedError
from diffpar.engines.tensor_parallel_linear import all_gather_last_dim, all_reduce_sum

logger = logging.getLogger("diffpar")

# Tests set this to run our own plans on classes that diffusers also plans (what releases before 0.40 get).
FORCE_DIFFPAR_PLANS = False


# ------------------------------------------------------------------------------------------------------------
# Plan selection and checks (local, no collectives)
# ------------------------------------------------------------------------------------------------------------


def tp_plan_for(model: torch.nn.Module) -> tuple[str, object]:
    """("diffusers", its `_tp_plan`) or ("diffpar", TensorParallelPlan); raises when neither exists."""
    native = diffusers_tp.native_tp_plan(model)
    if native and not FORCE_DIFFPAR_PLANS:
        return "diffusers", native
    plan = tp_plans.diffpar_tp_plan_for(model)
    if plan is not None:
        return "diffpar", plan
    names = sorted(tp_plans.supported_tp_models())
    raise UnsupportedError(
        f"tp_size for {type(model).__name__}: neither the installed diffusers nor diffpar has a tensor-parallel plan "
        f"for it. Models with a plan: {names} (plus any class with diffusers' `_tp_plan` on diffusers>=0.40). Use "
        "ulysses_size / ring_size for this model instead."
    )


def expand(model: torch.nn.Module, pattern: str) -> list[tuple[str, torch.nn.Module]]:
    """(path, module) for a glob with at most one `*` over a ModuleList."""
    if pattern.count("*") > 1:
        raise ValueError(f"plan key {pattern!r}: one '*' at most")
    if "*" not in pattern:
        return [(pattern, model.get_submodule(pattern))]
    prefix, _, suffix = pattern.partition("*")
    container = model.get_submodule(prefix.rstrip(".")) if prefix.rstrip(".") else model
    suffix = suffix.lstrip(".")
    out = []
    for i, block in enumerate(container):
        path = f"{prefix}{i}" + (f".{suffix}" if suffix else "")
        out.append((path, block.get_submodule(suffix) if suffix else block))
    return out


def _parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _linear_widths(model, engine: str, plan) -> list[tuple[str, int]]:
    """(what, width) for every width the plan splits: each must divide by tp."""
    widths = []
    for pattern, style in _all_linears(model, engine, plan).items():
        for path, lin in expand(model, pattern):
            kind, blocks = _style_blocks(style, lin)
            for b in blocks:
                widths.append((f"{path} ({kind}, width {b})", b))
    return widths


def _all_linears(model, engine: str, plan) -> dict:
    """Every linear the layout splits: diffusers' plan plus our modulation entries, or our plan."""
    if engine == "diffusers":
        return {**plan, **tp_plans.gathered_linears(model)}
    return plan.linears


def _style_blocks(style, linear) -> tuple[str, tuple[int, ...]]:
    """('colwise'|'rowwise', block widths along the split dimension) for our styles and diffusers' markers."""
    if isinstance(style, Packed):
        return style.kind, tuple(style.blocks)
    if style in ("colwise", "rowwise", tp_plans.GATHER):
        dim = linear.in_features if style == "rowwise" else linear.out_features
        return style, (dim,)
    # diffusers' PackedColwiseParallel / PackedRowwiseParallel (0.40+): proportions, or sizes on the Linear.
    kind = "colwise" if "Colwise" in type(style).__name__ else "rowwise"
    attr = "_tp_packed_col_blocks" if kind == "colwise" else "_tp_packed_row_blocks"
    blocks = getattr(style, "blocks", None) or getattr(linear, attr, None)
    total = linear.out_features if kind == "colwise" else linear.in_features
    if not blocks or total % sum(blocks):
        return kind, (total,)
    unit = total // sum(blocks)
    return kind, tuple(b * unit for b in blocks)


def head_counts(model: torch.nn.Module, engine: str, plan) -> dict[str, int]:
    """Attention module path -> heads, for every attention module whose projections the plan splits."""
    linears = plan if engine == "diffusers" else plan.linears
    counts = {}
    for pattern, style in linears.items():
        if style == tp_plans.GATHER:  # modulation: not attention
            continue
        for path, _ in expand(model, pattern):
            parent = _parent_path(path)
            while parent:
                module = model.get_submodule(parent)
                heads = getattr(module, "heads", None)
                if isinstance(heads, int):
                    counts[parent] = heads
                    break
                parent = _parent_path(parent)
    return counts


def _divisors_up_to(n: int, limit: int) -> list[int]:
    return [d for d in range(1, limit + 1) if n % d == 0]


def check_tensor_parallel(model: torch.nn.Module, tp_degree: int, config=None) -> None:
    """Local checks, no collectives. With `config`, also checks the hybrid with Ulysses."""
    engine, plan = tp_plan_for(model)
    params = list(model.parameters())
    if any(p.device.type == "meta" for p in params):
        raise UnsupportedError(
            f"tp_size={tp_degree} on {type(model).__name__}: some weights are on the meta device (offloaded or not "
            "loaded). Load the model fully onto this rank's device before enabling tensor parallelism."
        )
    if any(hasattr(m, "_hf_hook") for m in model.modules()) or getattr(model, "is_quantized", False):
        raise UnsupportedError(
            f"tp_size={tp_degree} on {type(model).__name__}: the model is offloaded (accelerate hooks) or quantized; "
            "its weights cannot be sliced per rank. Load it unquantized and without offloading."
        )
    heads = head_counts(model, engine, plan)
    widths = _linear_widths(model, engine, plan)
    constraints = sorted(set(heads.values()) | {w for _, w in widths})
    # The suggestion must also fit the launched world (a tp_size that does not divide it cannot be used).
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
    works = max(d for d in range(1, tp_degree + 1)
                if all(c % d == 0 for c in constraints) and (world is None or world % d == 0))
    bad_heads = {p: h for p, h in heads.items() if h % tp_degree}
    if bad_heads:
        path, h = next(iter(bad_heads.items()))
        raise UnsupportedError(
            f"tp_size={tp_degree} does not divide the {h} attention heads of {type(model).__name__} ({path}): tensor "
            f"parallelism gives each rank whole heads. The largest tp_size that works for this model is {works} "
            f"(heads {h} divide by {_divisors_up_to(h, tp_degree)}{f', world {world}' if world else ''}); use it, "
            "or ulysses_size / ring_size for the rest of the ranks."
        )
    bad_widths = [what for what, w in widths if w % tp_degree]
    if bad_widths:
        raise UnsupportedError(
            f"tp_size={tp_degree} does not divide a width {type(model).__name__} splits: {bad_widths[0]}"
            f"{f' (and {len(bad_widths) - 1} more)' if len(bad_widths) > 1 else ''}. Each rank must get an equal "
            f"slice. The largest tp_size that works for this model is {works}."
        )
    if engine == "diffpar":
        for pattern, attrs in plan.attention_attrs.items():
            for path, attn in expand(model, pattern):
                for attr in attrs:
                    value = getattr(attn, attr, None)
                    if isinstance(value, int) and value % tp_degree:
                        raise UnsupportedError(
                            f"tp_size={tp_degree}: {path}.{attr}={value} is not divisible by it. The largest tp_size "
                            f"that works for this model is {works}."
                        )
        for pattern in plan.sharded_norms:
            for path, norm in expand(model, pattern):
                _norm_width(norm, path)
    else:
        diffusers_tp.native_tp_prechecks(model, tp_degree)
    if config is not None:
        check_hybrid(model, tp_degree, config, heads)


def check_hybrid(model, tp_degree: int, config, heads: dict[str, int] | None = None) -> None:
    if config.ulysses_degree <= 1 or config.ulysses_anything:
        return
    if heads is None:
        engine, plan = tp_plan_for(model)
        heads = head_counts(model, engine, plan)
    for path, h in heads.items():
        local = h // tp_degree
        if local % config.ulysses_degree:
            raise UnsupportedError(
                f"ulysses_size={config.ulysses_degree} x tp_size={tp_degree} on {type(model).__name__}: each tensor-"
                f"parallel rank holds {h}/{tp_degree} = {local} heads of {path}, and Ulysses must spread those over "
                f"{config.ulysses_degree} ranks; {config.ulysses_degree} does not divide {local}. Use ulysses_size x "
                f"tp_size dividing {h} (e.g. a smaller ulysses_size and ring_size for the rest), or "
                "ulysses_anything=True."
            )


# ------------------------------------------------------------------------------------------------------------
# Apply
# ------------------------------------------------------------------------------------------------------------


def apply_tensor_parallel(model: torch.nn.Module, engine: str, plan, config, tp_mesh, handle, name: str) -> None:
    """Shard `model` over `tp_mesh` with the plan chosen at planning time (`engine`, `plan` from `tp_plan_for`)."""
    from diffpar.mesh import current_device

    tp = tp_mesh.size()
    group = tp_mesh.get_group()
    rank = dist.get_rank(group)
    if engine == "diffusers":
        _apply_native(model, tp_mesh, handle, name, config, current_device())
        gathered = tp_plans.gathered_linears(model)
        if gathered:  # modulation projections, which diffusers' plans leave whole on every rank
            _apply_diffpar(model, TensorParallelPlan(linears=gathered), rank, tp, group, handle,
                           f"{name} (modulation)")
    else:
        _apply_diffpar(model, plan, rank, tp, group, handle, name)
    logger.info("diffpar: %s tensor parallel over %d ranks (%s plan)", name, tp, engine)


# -- diffusers engine ----------------------------------------------------------------------------------------


def _hook_keys(model):
    return {id(m): (set(m._forward_pre_hooks), set(m._forward_hooks), hasattr(m, "_distribute_module_applied"))
            for m in model.modules()}


def _apply_native(model, tp_mesh, handle, name, config, device) -> None:
    from torch.distributed.tensor import DTensor

    before = _hook_keys(model)
    # Packed styles shard block by block: their DTensor's plain full_tensor() would put the blocks out of order.
    layouts = {}
    for pattern, style in type(model)._tp_plan.items():
        for _, linear in expand(model, pattern):
            layouts[id(linear)] = _style_blocks(style, linear)
    group, tp = tp_mesh.get_group(), tp_mesh.size()
    tp_config = diffusers_tp.apply_native(model, tp_mesh, dist.get_rank(), dist.get_world_size(), device)
    added = []
    for m in model.modules():
        pre, post, applied = before[id(m)]
        new_pre = [k for k in m._forward_pre_hooks if k not in pre]
        new_post = [k for k in m._forward_hooks if k not in post]
        flag = hasattr(m, "_distribute_module_applied") and not applied
        if new_pre or new_post or flag:
            added.append((m, new_pre, new_post, flag))
    sharded = [(m, key) for m in model.modules() for key, p in m._parameters.items() if isinstance(p, DTensor)]

    def undo():
        # Full weights back from the shards (a collective over the tp group, same order on every rank).
        for m, key in sharded:
            p = m._parameters[key]
            kind, blocks = layouts.get(id(m), ("replicated", ()))
            if len(blocks) > 1 and (key == "weight" or kind == "colwise"):
                dim = 0 if kind == "colwise" or key != "weight" else 1
                full = _unslice(p.to_local(), dim, blocks, tp, group)
            else:
                full = p.full_tensor()
            m._parameters[key] = torch.nn.Parameter(full, requires_grad=p.requires_grad)
        for m, new_pre, new_post, flag in added:
            for k in new_pre:
                m._forward_pre_hooks.pop(k, None)
            for k in new_post:
                m._forward_hooks.pop(k, None)
            if flag:
                del m._distribute_module_applied

    handle.add(f"{name}: tensor-parallel weights and hooks (diffusers _tp_plan)", undo)
    if getattr(model, "_parallel_config", None) is None and config.cp_degree == 1:
        # diffusers' own guards (no save/fuse/offload of a sharded model) read this; with CP it holds the CP config.
        from diffusers.models._modeling_parallel import ParallelConfig

        model._parallel_config = ParallelConfig(tensor_parallel_config=tp_config)
        handle.add(f"{name}: model._parallel_config (tensor parallel)", lambda: setattr(model, "_parallel_config", None))


# -- diffpar engine (plain tensors) --------------------------------------------------------------------------


def _slice(t: torch.Tensor, dim: int, blocks, rank: int, tp: int) -> torch.Tensor:
    parts, offset = [], 0
    for b in blocks:
        step = b // tp
        parts.append(t.narrow(dim, offset + rank * step, step))
        offset += b
    return torch.cat(parts, dim=dim).contiguous() if len(parts) > 1 else parts[0].contiguous()


def _unslice(local: torch.Tensor, dim: int, blocks, tp: int, group) -> torch.Tensor:
    """Inverse of `_slice` over all ranks: all-gather the slices and put every block back in place."""
    gathered = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(gathered, local.contiguous(), group=group)
    pieces, local_offset = [], 0
    for b in blocks:
        step = b // tp
        pieces.extend(g.narrow(dim, local_offset, step) for g in gathered)
        local_offset += step
    return torch.cat(pieces, dim=dim)


class _GatherColumns:
    """Forward hook of a colwise_gather Linear: concatenate every rank's output features, in rank order."""

    def __init__(self, group, tp: int, width: int):
        self.group = group
        self.sizes = [width] * tp

    def __call__(self, module, args, output):
        return all_gather_last_dim(output, self.sizes, self.group)


class _RowwiseReduce:
    """Forward hook of a rowwise Linear: sum the partial products over the tp group, then add the bias once."""

    def __init__(self, group, bias: torch.Tensor | None):
        self.group = group
        self.bias = bias

    def __call__(self, module, args, output):
        output = all_reduce_sum(output.contiguous(), self.group)
        return output if self.bias is None else output + self.bias


def _shard_linear(linear: torch.nn.Linear, style, rank: int, tp: int, group):
    """Replace the Linear's parameters by this rank's slice; returns the undo function."""
    kind, blocks = _style_blocks(style, linear)
    weight, bias = linear.weight, linear.bias
    in_before, out_before = linear.in_features, linear.out_features
    dim = 1 if kind == "rowwise" else 0
    with torch.no_grad():
        linear.weight = torch.nn.Parameter(_slice(weight.detach(), dim, blocks, rank, tp), requires_grad=weight.requires_grad)
        hook = None
        if kind != "rowwise":
            if bias is not None:
                linear.bias = torch.nn.Parameter(_slice(bias.detach(), 0, blocks, rank, tp), requires_grad=bias.requires_grad)
            linear.out_features = linear.weight.shape[0]
            if kind == tp_plans.GATHER:
                hook = linear.register_forward_hook(_GatherColumns(group, tp, linear.out_features))
        else:
            # The bias is added once after the all-reduce; it stays a Parameter owned by the hook.
            linear.bias = None
            hook = linear.register_forward_hook(_RowwiseReduce(group, bias))
            linear.in_features = linear.weight.shape[1]
    del weight  # the full weight is freed here: memory per rank drops to the slice

    def undo():
        with torch.no_grad():
            full = _unslice(linear.weight.detach(), dim, blocks, tp, group)
            requires_grad = linear.weight.requires_grad
            linear.weight = torch.nn.Parameter(full, requires_grad=requires_grad)
            if kind != "rowwise":
                if linear.bias is not None:
                    rg = linear.bias.requires_grad
                    linear.bias = torch.nn.Parameter(_unslice(linear.bias.detach(), 0, blocks, tp, group), requires_grad=rg)
                if hook is not None:
                    hook.remove()
            else:
                hook.remove()
                linear.bias = bias
        linear.in_features, linear.out_features = in_before, out_before

    return undo


def _norm_width(norm, path: str) -> int:
    weight = getattr(norm, "weight", None)
    shape = getattr(norm, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    if weight is not None and weight.dim() == 1:
        return int(weight.shape[0])
    if isinstance(getattr(norm, "dim", None), int):
        return norm.dim
    raise UnsupportedError(f"tensor parallel: cannot tell the width of the norm at {path} ({type(norm).__name__}).")


class HeadShardedRMSNorm(torch.nn.Module):
    """An RMSNorm over all heads, on a rank holding some of them: the mean of squares is summed over the tp group."""

    def __init__(self, original: torch.nn.Module, path: str, rank: int, tp: int, group):
        super().__init__()
        self.full_width = _norm_width(original, path)
        self.eps = getattr(original, "eps", None)
        self.group = group
        weight = getattr(original, "weight", None)
        self.weight = None if weight is None else torch.nn.Parameter(
            _slice(weight.detach(), 0, (self.full_width,), rank, tp), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = xf.pow(2).sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_sq, group=self.group)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        out = (xf * torch.rsqrt(sum_sq / self.full_width + eps)).to(x.dtype)
        return out * self.weight if self.weight is not None else out


def _apply_diffpar(model, plan: TensorParallelPlan, rank: int, tp: int, group, handle, name: str) -> None:
    undos = []
    try:
        for pattern, style in plan.linears.items():
            for _, linear in expand(model, pattern):
                undos.append(_shard_linear(linear, style, rank, tp, group))
        for pattern in plan.sharded_norms:
            for path, norm in expand(model, pattern):
                parent = model.get_submodule(_parent_path(path)) if "." in path else model
                attr = path.rsplit(".", 1)[-1]
                setattr(parent, attr, HeadShardedRMSNorm(norm, path, rank, tp, group))
                undos.append(lambda parent=parent, attr=attr, norm=norm: setattr(parent, attr, norm))
        for pattern, attrs in plan.attention_attrs.items():
            for _, attn in expand(model, pattern):
                before = {a: getattr(attn, a) for a in attrs if isinstance(getattr(attn, a, None), int)}
                for a, v in before.items():
                    setattr(attn, a, v // tp)
                undos.append(lambda attn=attn, before=before: [setattr(attn, a, v) for a, v in before.items()])
    finally:
        # Registered even on a partial failure, so detach restores what was sharded.
        def undo():
            for fn in reversed(undos):
                fn()

        handle.add(f"{name}: tensor-parallel weights, hooks and head counts (diffpar plan)", undo)


# ------------------------------------------------------------------------------------------------------------
# Accounting (benchmarks, docs): what one rank holds, computed from the plan alone (works on meta models)
# ------------------------------------------------------------------------------------------------------------


def per_rank_weight_bytes(model: torch.nn.Module, tp: int, bytes_per_element: int | None = None) -> dict:
    """{'full': bytes of the whole model, 'per_rank': bytes one of `tp` ranks holds, 'sharded': bytes split}.

    Planned linears hold 1/tp of their weight (and of a colwise bias; a rowwise bias stays whole), head-sharded
    norms 1/tp of theirs; everything else (embeddings, modulation, norms, output projection) stays whole.
    """
    engine, plan = tp_plan_for(model)
    linears = _all_linears(model, engine, plan)
    norms = () if engine == "diffusers" else plan.sharded_norms

    def size(t):
        return t.numel() * (bytes_per_element or t.element_size())

    full = sum(size(p) for p in model.parameters())
    split = 0
    reduced = 0
    for pattern, style in linears.items():
        for _, linear in expand(model, pattern):
            kind, _ = _style_blocks(style, linear)
            split += size(linear.weight)
            reduced += size(linear.weight) - size(linear.weight) // tp
            if linear.bias is not None and kind != "rowwise":
                split += size(linear.bias)
                reduced += size(linear.bias) - size(linear.bias) // tp
    for pattern in norms:
        for _, norm in expand(model, pattern):
            if getattr(norm, "weight", None) is not None:
                split += size(norm.weight)
                reduced += size(norm.weight) - size(norm.weight) // tp
    return {"full": full, "per_rank": full - reduced, "sharded": split, "engine": engine}
