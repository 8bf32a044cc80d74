"""diffusers' tensor-parallel plans (0.40+), feature-detected and translated; diffpar never runs diffusers' engine.

- `native_tp_plan(model)`: the class's `_tp_plan` when the installed release ships tensor parallelism, else None.
- `translate_tp_plan(model, plan)`: that plan in plain data diffpar's engine reads: pattern -> ("colwise" |
  "rowwise", absolute block widths of a packed projection or None). diffusers' `PackedColwiseParallel` /
  `PackedRowwiseParallel` carry proportions, or leave them on the Linear (`_tp_packed_col_blocks` /
  `_tp_packed_row_blocks`, set in the model's `__init__`); both become widths here.
- `native_tp_prechecks(model, tp)`: diffusers' own refusals (offloaded, quantized, LoRA-injected models) where
  the release has them (0.41+), as diffpar errors. One is skipped: a model loaded with torchao whose quantized
  weights diffpar cuts as they are (compat/quantized_tensors.py) passes diffusers' "any quantized model" refusal,
  which is about sharding into DTensors, an engine diffpar does not use; other quantizers stay refused by name.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from diffpar.compat.quantized_tensors import is_plain, loader_quantization, refusal
from diffpar.errors import UnsupportedError


@lru_cache(None)
def has_native_tp() -> bool:
    try:
        from diffusers.hooks import tensor_parallel as htp
        from diffusers.models._modeling_parallel import TensorParallelConfig  # noqa: F401
    except ImportError:
        return False
    return hasattr(htp, "apply_tensor_parallel")


def native_tp_plan(model: torch.nn.Module) -> dict | None:
    if not has_native_tp():
        return None
    return getattr(type(model), "_tp_plan", None) or None


def native_tp_prechecks(model: torch.nn.Module, tp_degree: int, *, degree_checks: bool = True) -> None:
    """diffusers' refusals for a model in memory; head counts are checked by diffpar before this.

    `degree_checks=False`: only the checks of the model's state (offloaded, quantized, adapter-wrapped), run at
    degree 1, for a split diffpar deals unevenly itself (diffusers refuses any degree that does not divide a head
    count or a width)."""
    from diffusers.hooks import tensor_parallel as htp
    from diffusers.models._modeling_parallel import TensorParallelConfig

    check = getattr(htp, "_check_tp_supported", None)
    if check is None:
        return
    params = inspect.signature(check).parameters
    if list(params)[:4] != ["model_name", "tp_plan", "num_heads", "tp_config"]:
        return  # a release whose pre-check we do not know: diffpar's own checks stand alone
    degree = tp_degree if degree_checks else 1

    def run_checks(checked) -> None:
        kwargs = {"model": checked} if "model" in params else {}
        check(type(model).__name__, type(model)._tp_plan, None, TensorParallelConfig(tp_degree=degree), **kwargs)

    try:
        try:
            run_checks(model)
        except ValueError:
            method = loader_quantization(model)
            if method is None or "model" not in params:
                raise
            if method != "torchao":
                raise _NamedQuantizer(method) from None
            uncut = _uncuttable_weight(model)
            if uncut is not None:
                raise _NamedQuantizer(method, uncut) from None
            # A torchao model whose every quantized weight diffpar cuts as it is (never through DTensor): diffusers'
            # refusal of any quantized model is the one check skipped; the same checks on a view that hides only
            # the quantizer must pass (offloaded, LoRA-injected, group offloading, device_map still refuse).
            try:
                run_checks(_WithoutQuantizer(model))
            except ValueError:
                raise
            except Exception as exc:  # noqa: BLE001  (a release whose check needs more than the view gives)
                raise _NamedQuantizer(method, "diffusers' pre-check could not run without its quantized-model "
                                      f"refusal on this release: {type(exc).__name__}: {exc}") from None
        specs = getattr(htp, "resolve_tp_shard_specs", None)
        if specs is not None:
            specs(model, type(model)._tp_plan, degree)
    except _NamedQuantizer as exc:
        why = f" and diffpar cannot split ({exc.reason})" if exc.reason else ""
        raise UnsupportedError(
            f"tp_size={tp_degree} on {type(model).__name__}: the model was loaded quantized with {exc.method!r}, "
            f"which diffusers' tensor-parallel checks refuse{why}. "
            "Load it unquantized, or quantized with torchao int8 weight-only or float8 (TorchAoConfig), whose "
            "weights diffpar splits as they are."
        ) from None
    except ValueError as exc:
        raise UnsupportedError(f"tp_size={tp_degree} on {type(model).__name__}: {exc}") from None


class _NamedQuantizer(Exception):
    """diffusers refused a model loaded quantized, and the refusal stands: which quantizer, and diffpar's reason."""

    def __init__(self, method: str, reason: str | None = None):
        super().__init__(method)
        self.method, self.reason = method, reason


def _uncuttable_weight(model: torch.nn.Module) -> str | None:
    """The first quantized parameter diffpar cannot cut along any dimension, with why; None when every one can be
    (which dimension a layer needs is checked layer by layer by the tensor-parallel engine)."""
    for name, param in model.named_parameters():
        if is_plain(param):
            continue
        reasons = [refusal(param, dim) for dim in range(param.dim())]
        if all(r is not None for r in reasons):
            return f"{name}: {reasons[0]}"
    return None


class _WithoutQuantizer:
    """`model` as diffusers' pre-check reads it, with its quantizer hidden: every other attribute is the model's."""

    hf_quantizer = None
    is_quantized = False

    def __init__(self, model: torch.nn.Module):
        object.__setattr__(self, "_model", model)

    @property
    def __class__(self):  # the check names the model by its class
        return type(object.__getattribute__(self, "_model"))

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_model"), name)


def _blocks(style, linear, kind: str) -> tuple[int, ...]:
    attr = "_tp_packed_col_blocks" if kind == "colwise" else "_tp_packed_row_blocks"
    blocks = getattr(style, "blocks", None) or getattr(linear, attr, None)
    full = linear.out_features if kind == "colwise" else linear.in_features
    if not blocks or full % sum(blocks):
        raise UnsupportedError(
            f"diffusers' _tp_plan packs {type(linear).__name__} ({full} features) into blocks {blocks!r}, which do "
            "not split it; diffpar cannot translate this plan."
        )
    unit = full // sum(blocks)
    return tuple(int(b) * unit for b in blocks)


def _first_match(model: torch.nn.Module, pattern: str):
    if "*" not in pattern:
        return model.get_submodule(pattern)
    prefix, _, suffix = pattern.partition("*")
    container = model.get_submodule(prefix.strip(".")) if prefix.strip(".") else model
    if len(container) == 0:
        return None
    return container[0].get_submodule(suffix.strip(".")) if suffix.strip(".") else container[0]


def translate_tp_plan(model: torch.nn.Module, plan: dict) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """diffusers' `_tp_plan` as pattern -> ("colwise" | "rowwise", packed block widths or None).

    Block widths are read from the first module a glob matches (every block of a ModuleList is built alike).
    A style diffusers adds later is refused by name rather than guessed."""
    out = {}
    for pattern, style in plan.items():
        if style in ("colwise", "rowwise"):
            out[pattern] = (style, None)
            continue
        name = type(style).__name__
        if name not in ("PackedColwiseParallel", "PackedRowwiseParallel"):
            raise UnsupportedError(
                f"{type(model).__name__}._tp_plan uses style {style!r} on {pattern!r}, which diffpar does not "
                "translate (it knows colwise, rowwise, PackedColwiseParallel, PackedRowwiseParallel)."
            )
        kind = "colwise" if name == "PackedColwiseParallel" else "rowwise"
        linear = _first_match(model, pattern)
        out[pattern] = (kind, None if linear is None else _blocks(style, linear, kind))
    return out
