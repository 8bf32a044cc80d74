"""diffusers' context-parallel plan entries and hooks, behind functions named for what they do (0.36-0.42.1).

diffusers keeps these in private places: the plan entry classes in `diffusers.models._modeling_parallel`, the hook
name templates, the submodule lookup and the argument lookup in `diffusers.hooks.context_parallel`, the sharders'
meshes on `ContextParallelConfig._flattened_mesh`. Families and engines name none of them; they call this module.
Every name used here exists, with the same meaning, in every release from 0.36.0 to 0.42.1.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

# ---------------------------------------------------------------------------------------------------------------
# Plan entries (diffusers' `_cp_plan` format)
# ---------------------------------------------------------------------------------------------------------------


def split_input(split_dim: int, expected_dims: int | None = None, split_output: bool = False):
    """A plan entry that splits one input of a module (or, with `split_output=True`, that output) along
    `split_dim` over the context-parallel ranks."""
    from diffusers.models._modeling_parallel import ContextParallelInput

    return ContextParallelInput(split_dim=split_dim, expected_dims=expected_dims, split_output=split_output)


def gather_output(gather_dim: int, expected_dims: int | None = None):
    """A plan entry that gathers a module's output along `gather_dim` from the context-parallel ranks."""
    from diffusers.models._modeling_parallel import ContextParallelOutput

    return ContextParallelOutput(gather_dim=gather_dim, expected_dims=expected_dims)


def is_gather_entry(entry) -> bool:
    """Whether a plan value gathers outputs (one gather entry, or a list/tuple of them) rather than splitting."""
    from diffusers.models._modeling_parallel import ContextParallelOutput

    return isinstance(entry, (ContextParallelOutput, list, tuple))


def splits_output(entry) -> bool:
    return bool(getattr(entry, "split_output", False))


def native_cp_plan(cls) -> dict | None:
    """The context-parallel plan diffusers ships for a model class, or None."""
    return getattr(cls, "_cp_plan", None) or None


# ---------------------------------------------------------------------------------------------------------------
# Cutting and joining a tensor exactly as diffusers' split and gather hooks do
# ---------------------------------------------------------------------------------------------------------------


def _uneven_splits(cp_config) -> bool:
    return bool(getattr(cp_config, "ulysses_anything", False) or getattr(cp_config, "ring_anything", False))


def shard(tensor: torch.Tensor, dim: int, cp_config) -> torch.Tensor:
    """This rank's part of `tensor` along `dim`, cut as diffusers' context-parallel input hooks cut it."""
    from diffusers.hooks import context_parallel as hcp

    mesh = cp_config._flattened_mesh
    if _uneven_splits(cp_config):  # 0.37+, only with the option itself
        return hcp.PartitionAnythingSharder.shard_anything(tensor, dim, mesh)
    return hcp.EquipartitionSharder.shard(tensor, dim, mesh)


def unshard(tensor: torch.Tensor, dim: int, cp_config) -> torch.Tensor:
    """The whole tensor from every rank's part along `dim` (a collective), as diffusers' gather hooks join it."""
    from diffusers.hooks import context_parallel as hcp

    mesh = cp_config._flattened_mesh
    if _uneven_splits(cp_config):
        return hcp.PartitionAnythingSharder.unshard_anything(tensor, dim, mesh)
    return hcp.EquipartitionSharder.unshard(tensor, dim, mesh)


# ---------------------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------------------


def register_named_hook(module: torch.nn.Module, hook, name: str) -> None:
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def remove_named_hook(module: torch.nn.Module, name: str) -> None:
    """Remove the hook `name` from `module` only (not its children); absent hooks are skipped."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(name, recurse=False)


def _hooks_on(module: torch.nn.Module) -> list:
    registry = getattr(module, "_diffusers_hook", None)
    return list(registry.hooks.values()) if registry is not None else []


def has_split_hook(module: torch.nn.Module) -> bool:
    """Whether a context-parallel plan splits this module's inputs (or outputs) with a diffusers hook."""
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    return any(isinstance(h, ContextParallelSplitHook) for h in _hooks_on(module))


def has_gather_hook(module: torch.nn.Module) -> bool:
    """Whether a context-parallel plan gathers this module's output with a diffusers hook."""
    from diffusers.hooks.context_parallel import ContextParallelGatherHook

    return any(isinstance(h, ContextParallelGatherHook) for h in _hooks_on(module))


class ForwardArguments:
    """One forward call's arguments by parameter name, passed by position or keyword, readable and replaceable."""

    def __init__(self, lookup, args: list, kwargs: dict):
        self._lookup, self._args, self._kwargs = lookup, args, kwargs

    def get(self, name: str):
        return self._lookup(name, self._args, self._kwargs)[0]

    def set(self, name: str, value) -> None:
        _, is_kwarg, index = self._lookup(name, self._args, self._kwargs)
        if is_kwarg:
            self._kwargs[name] = value
        else:
            self._args[index] = value


def argument_rewriting_hook(rewrite: Callable[[ForwardArguments], None]):
    """A diffusers hook that lets `rewrite(arguments)` replace named forward arguments before each call.

    A diffusers hook rather than a torch pre-hook so that it nests among diffusers' own context-parallel hooks in
    registration order."""
    from diffusers.hooks.context_parallel import ModuleForwardMetadata
    from diffusers.hooks.hooks import ModelHook
    from diffusers.utils.torch_utils import unwrap_module

    class ArgumentRewritingHook(ModelHook):
        def initialize_hook(self, module):
            self.metadata = ModuleForwardMetadata(_cls=unwrap_module(module).__class__)
            return module

        def pre_forward(self, module, *args, **kwargs):
            args = list(args)
            rewrite(ForwardArguments(self.metadata._get_parameter_from_args_kwargs, args, kwargs))
            return tuple(args), kwargs

    return ArgumentRewritingHook()


def _hook_name(module_id: str, entries) -> str:
    from diffusers.hooks.context_parallel import (
        _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE,
        _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE,
    )

    template = _CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE if isinstance(entries, dict) else _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE
    return template.format(module_id)


def _plan_targets(model: torch.nn.Module, module_id: str) -> list[torch.nn.Module]:
    """The submodules a plan key names (`""`: the model; `"blocks.*"`: every block), as diffusers resolves it."""
    from diffusers.hooks.context_parallel import _get_submodule_by_name

    targets = _get_submodule_by_name(model, module_id)
    return targets if isinstance(targets, list) else [targets]


def register_input_split_hooks(net: torch.nn.Module, cp_config, plan: dict) -> None:
    """diffusers' `apply_context_parallel`, with split hooks that let any output through and skip planned
    arguments a call leaves out.

    diffusers' split hook checks that its module returns tensors, but a ControlNet returns lists of residuals (and
    Z-Image's a dict). The split itself is diffusers' own; gather entries use diffusers' gather hook. Hook names are
    diffusers' own, so `remove_plan_hooks` removes them, also after a registration that stopped part way. Every
    plan key is resolved before the first hook is registered.
    """
    from diffusers.hooks.context_parallel import ContextParallelGatherHook, ContextParallelSplitHook
    from diffusers.models._modeling_parallel import ContextParallelOutput

    class InputSplitHook(ContextParallelSplitHook):
        """Splits what the call passes; a planned argument the call leaves out (a ControlNet's blocks get no
        `modulate_index`, which the transformer's plan names) is skipped rather than looked up by position."""

        def initialize_hook(self, module):
            module = super().initialize_hook(module)
            params = list(inspect.signature(self.module_forward_metadata._cls.forward).parameters)[1:]
            self.positions = {name: i for i, name in enumerate(params)}
            self.planned = dict(self.metadata)
            return module

        def pre_forward(self, module, *args, **kwargs):
            self.metadata = {
                name: entry for name, entry in self.planned.items()
                if splits_output(entry) or name in kwargs or self.positions.get(name, len(args)) < len(args)
            }
            try:
                return super().pre_forward(module, *args, **kwargs)
            finally:
                self.metadata = self.planned

        def post_forward(self, module, output):
            if any(splits_output(entry) for entry in self.metadata.values()):
                return super().post_forward(module, output)
            return output

    work = []
    for module_id, entries in plan.items():
        if isinstance(entries, dict):
            make = lambda entries=entries: InputSplitHook(entries, cp_config)  # noqa: E731
        elif isinstance(entries, ContextParallelOutput):
            make = lambda entries=entries: ContextParallelGatherHook([entries], cp_config)  # noqa: E731
        else:
            raise ValueError(f"context-parallel plan entry {module_id!r}: unsupported {type(entries).__name__}")
        work.extend((target, make, _hook_name(module_id, entries)) for target in _plan_targets(net, module_id))
    for target, make, name in work:
        register_named_hook(target, make(), name)
    tag_plan_hooks(net, plan)


def tag_plan_hooks(model: torch.nn.Module, plan: dict, tokens: str | None = None) -> None:
    """Label each context-parallel hook of `plan` with its plan key, the model's class and what its sequence counts
    (`tokens`: "video", "audio", "image", or None), for error messages that name which input could not be split."""
    for module_id, entries in plan.items():
        for target in _plan_targets(model, module_id):
            registry = getattr(target, "_diffusers_hook", None)
            hook = registry.get_hook(_hook_name(module_id, entries)) if registry is not None else None
            if hook is not None:
                hook.diffpar_plan_key = module_id
                hook.diffpar_model = type(model).__name__
                hook.diffpar_tokens = tokens


def remove_plan_hooks(model: torch.nn.Module, plan: dict) -> None:
    """Remove the context-parallel hooks a plan registered (by diffusers' `apply_context_parallel` or by
    `register_input_split_hooks`). Tolerates a registration that stopped part way: hooks never registered and plan
    keys that name no submodule are skipped."""
    for module_id, entries in plan.items():
        try:
            targets = _plan_targets(model, module_id)
        except ValueError:
            continue
        for target in targets:
            remove_named_hook(target, _hook_name(module_id, entries))


def ulysses_group(parallel_config):
    """The process group of the Ulysses ranks of a processor's parallel config (diffusers keeps its mesh private)."""
    return parallel_config.context_parallel_config._ulysses_mesh.get_group()


# ---------------------------------------------------------------------------------------------------------------
# Forward seams a model class leaves for an outside context-parallel helper (Cosmos 3: `_cp_shard_fn`,
# `_cp_gather_fn`, both None on the class; the forward calls them where set)
# ---------------------------------------------------------------------------------------------------------------

_SHARD_SEAM, _GATHER_SEAM = "_cp_shard_fn", "_cp_gather_fn"


def occupied_cp_seams(model: torch.nn.Module) -> list[str]:
    """The names of the model's shard/gather seams something has already set (another helper holds them)."""
    return [name for name in (_SHARD_SEAM, _GATHER_SEAM) if getattr(model, name, None) is not None]


def set_cp_seams(model: torch.nn.Module, shard, gather) -> None:
    """Set the model's shard and gather seams on the instance (the class keeps its None)."""
    setattr(model, _SHARD_SEAM, shard)
    setattr(model, _GATHER_SEAM, gather)


def remove_cp_seams(model: torch.nn.Module) -> None:
    """Drop the instance's seams, whichever were set, so the class's None shows again."""
    for name in (_SHARD_SEAM, _GATHER_SEAM):
        vars(model).pop(name, None)
