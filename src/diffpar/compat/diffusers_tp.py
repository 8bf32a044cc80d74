"""diffusers' tensor-parallel machinery (0.40+), feature-detected.

- `native_tp_plan(model)`: the class's `_tp_plan` when the installed release can apply it, else None.
- `allow_device(type)`: diffusers refuses meshes whose device type is not in `_SUPPORTED_TP_DEVICES`
  ("cuda", "neuron", "tpu", "xpu"); a gloo CPU mesh computes the same thing (measured 2.4e-7 on Flux), so we
  add the device to that tuple only for the duration of the call that checks it.
- `native_tp_prechecks(model, tp)`: diffusers' own refusals (offloaded, quantized, LoRA-injected models) where
  the release has them (0.41+), as diffpar errors.
"""
from __future__ import annotations

import contextlib
import inspect
from functools import lru_cache

import torch

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


@contextlib.contextmanager
def allow_device(device_type: str):
    from diffusers.hooks import tensor_parallel as htp

    allowed = getattr(htp, "_SUPPORTED_TP_DEVICES", None)
    if allowed is None or device_type in allowed:
        yield
        return
    htp._SUPPORTED_TP_DEVICES = tuple(allowed) + (device_type,)
    try:
        yield
    finally:
        htp._SUPPORTED_TP_DEVICES = allowed


def native_tp_prechecks(model: torch.nn.Module, tp_degree: int) -> None:
    """diffusers' refusals for a model in memory; head counts are checked by diffpar before this."""
    from diffusers.hooks import tensor_parallel as htp
    from diffusers.models._modeling_parallel import TensorParallelConfig

    check = getattr(htp, "_check_tp_supported", None)
    if check is None:
        return
    params = inspect.signature(check).parameters
    if list(params)[:4] != ["model_name", "tp_plan", "num_heads", "tp_config"]:
        return  # a release whose pre-check we do not know: diffpar's own checks stand alone
    kwargs = {"model": model} if "model" in params else {}
    try:
        check(type(model).__name__, type(model)._tp_plan, None, TensorParallelConfig(tp_degree=tp_degree), **kwargs)
        specs = getattr(htp, "resolve_tp_shard_specs", None)
        if specs is not None:
            specs(model, type(model)._tp_plan, tp_degree)
    except ValueError as exc:
        raise UnsupportedError(f"tp_size={tp_degree} on {type(model).__name__}: {exc}") from None


def apply_native(model: torch.nn.Module, tp_mesh, rank: int, world_size: int, device) -> object:
    """diffusers' apply_tensor_parallel on `tp_mesh`; returns the TensorParallelConfig it used."""
    from diffusers.hooks.tensor_parallel import apply_tensor_parallel
    from diffusers.models._modeling_parallel import TensorParallelConfig

    tp_config = TensorParallelConfig(mesh=tp_mesh)
    tp_config.setup(rank, world_size, device, tp_mesh)
    with allow_device(tp_mesh.device_type):
        apply_tensor_parallel(model, tp_config, type(model)._tp_plan)
    return tp_config
