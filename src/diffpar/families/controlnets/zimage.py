"""Z-Image ControlNets (`ZImageControlNetModel`, Z-Image-Turbo-Fun-Controlnet-Union 1.0 / 2.0 / 2.1), context parallel.

The ControlNet borrows the transformer's embedders and its two refiner stacks (`from_transformer`: the same module
objects), then runs its control layers over the unified [image, caption] sequence. Its hints are added to the
transformer's unified sequence, which diffpar's Z-Image plan (families/transformers/zimage.py) splits entering `layers.0`. So:

- control layers, main pass: the unified condition `c` is split entering block 0, and `x` (the transformer's
  unified sequence) and the RoPE table at every block, like the transformer's `layers`; the attention mask stays
  whole, as there (after Ulysses' all-to-all every rank attends over the whole sequence). The hints leave sharded:
  no gather.
- Union 1.0's own control refiner (ZImageTransformerBlock over the image tokens) is split and gathered within the
  stack, like the transformer's refiners.
- 2.0 / 2.1 first refine the condition over the image tokens (2.0 with the control layers themselves, 2.1 with own
  blocks) and add the resulting hints between the blocks of the *shared* noise refiner. The transformer's plan
  splits that stack at its first block and gathers at its last, so between blocks it is sharded while those hints
  are whole. Inside the ControlNet's call only, the shared refiner's blocks are therefore made whole in, whole out
  (split before, gather after each block; torch forward hooks, which run outside diffusers' hooks), and the
  condition refinement runs whole on every rank (2 blocks over the image tokens). Outside the ControlNet's call
  the hooks do nothing: the transformer's own pass is untouched.

Which pass of the control layers is the main one is counted per ControlNet call (2.0 runs them twice).
"""
from __future__ import annotations

import inspect

import torch

from diffpar.compat.diffusers_cp_hooks import gather_output, has_gather_hook, has_split_hook, split_input, unshard
from diffpar.errors import UnsupportedError
from diffpar.families.controlnets.base import ControlNetFamily, register_controlnet_family, shard


def _zimage_plan(net) -> dict:
    """Data part: Union 1.0's own refiner over the image tokens, split and gathered within the stack."""
    if net.add_control_noise_refiner is not None or not len(net.control_noise_refiner):
        return {}
    n = len(net.control_noise_refiner)
    rope = {"freqs_cis": split_input(split_dim=1, expected_dims=3)}
    tokens = {"x": split_input(split_dim=1, expected_dims=3)}
    plan = {"control_noise_refiner.0": {**tokens, **rope} if n == 1 else tokens}
    if n > 1:
        plan["control_noise_refiner.*"] = rope
    plan[f"control_noise_refiner.{n - 1}"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


class _Args:
    """Read and replace one named argument of a forward call, whether passed by position or keyword."""

    def __init__(self, forward):
        self.names = list(inspect.signature(forward).parameters)[1:]  # without self

    def get(self, name, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        i = self.names.index(name)
        return args[i] if i < len(args) else None

    def set(self, name, value, args, kwargs):
        if name in kwargs:
            kwargs[name] = value
            return args, kwargs
        i = self.names.index(name)
        return args[:i] + (value,) + args[i + 1:], kwargs


class _CallState:
    """Whether the ControlNet's forward is running, and how many passes over its control layers it made."""

    def __init__(self, main_pass: int):
        self.active = False
        self.passes = 0
        self.main_pass = main_pass

    @property
    def in_main_pass(self) -> bool:
        return self.active and self.passes == self.main_pass


def _install(net, cp_config, handle, label: str) -> None:
    removables = []

    def remove():
        for r in reversed(removables):
            r.remove()
        removables.clear()

    handle.add(f"{label}: Z-Image ControlNet split hooks (control layers, shared refiner)", remove)
    state = _CallState(main_pass=2 if net.add_control_noise_refiner == "control_layers" else 1)

    def enter(module, args, kwargs):
        state.active, state.passes = True, 0

    def leave(module, args, kwargs, output):
        state.active = False

    removables.append(net.register_forward_pre_hook(enter, with_kwargs=True))
    removables.append(net.register_forward_hook(leave, with_kwargs=True, always_call=True))

    # Control layers: split on their main pass only (2.0 also runs them over the image tokens first, whole).
    blocks = list(net.control_layers)
    block_args = _Args(type(blocks[0]).forward)
    for i, block in enumerate(blocks):
        def split_main_pass(module, args, kwargs, first=(i == 0)):
            if first and state.active:
                state.passes += 1
            if not state.in_main_pass:
                return args, kwargs
            names = ("c", "x", "freqs_cis") if first else ("x", "freqs_cis")
            for name in names:
                value = block_args.get(name, args, kwargs)
                if isinstance(value, torch.Tensor):
                    args, kwargs = block_args.set(name, shard(value, 1, cp_config), args, kwargs)
            return args, kwargs

        removables.append(block.register_forward_pre_hook(split_main_pass, with_kwargs=True))

    # Shared refiners: the ControlNet calls them with fewer positional arguments than the transformer (no noise
    # mask), and diffusers' split hook looks planned arguments up by a position cached from the transformer's
    # calls, without a bounds check. During our call, missing trailing arguments are passed as their defaults.
    for stack in (net.noise_refiner, net.context_refiner):
        params = list(inspect.signature(type(stack[0]).forward).parameters.values())[1:]
        for block in stack:
            def complete_args(module, args, kwargs, params=params):
                if not state.active or len(args) >= len(params):
                    return args, kwargs
                missing = [p for p in params[len(args):] if p.name not in kwargs]
                if any(p.default is inspect.Parameter.empty for p in missing):
                    return args, kwargs
                return args + tuple(p.default for p in missing[: len(params) - len(args)]), kwargs

            removables.append(block.register_forward_pre_hook(complete_args, with_kwargs=True))

    # Shared noise refiner with hints added between its blocks (2.0 / 2.1): whole in, whole out, during our call.
    if net.add_control_noise_refiner is not None:
        refiner = list(net.noise_refiner)
        stack_split = _transformer_splits_stack(refiner)
        if stack_split:
            refiner_args = _Args(type(refiner[0]).forward)
            last = len(refiner) - 1
            for i, block in enumerate(refiner):
                def split_before(module, args, kwargs, i=i):
                    if not state.active or i == 0:  # block 0: the transformer's own hook splits
                        return args, kwargs
                    x = refiner_args.get("x", args, kwargs)
                    return refiner_args.set("x", shard(x, 1, cp_config), args, kwargs)

                def gather_after(module, args, kwargs, output, i=i):
                    if not state.active or i == last:  # last block: the transformer's own hook gathers
                        return output
                    return unshard(output, 1, cp_config)

                removables.append(block.register_forward_pre_hook(split_before, with_kwargs=True))
                removables.append(block.register_forward_hook(gather_after, with_kwargs=True))



def _transformer_splits_stack(blocks) -> bool:
    """Whether the transformer's context-parallel plan splits this stack at its first block and gathers at its last
    (diffpar's Z-Image plan); anything else would make our per-block split/gather wrong, so it is refused."""
    splits = has_split_hook(blocks[0])
    gathers = has_gather_hook(blocks[-1])
    middle_gathers = any(has_gather_hook(b) for b in blocks[:-1])
    if not splits and not gathers:
        return False
    if not (splits and gathers) or middle_gathers:
        raise UnsupportedError(
            "Z-Image ControlNet: the transformer's context-parallel plan splits its noise refiner in a way diffpar's "
            "ControlNet support does not know (expected: split entering the first block, gathered after the last). "
            "Use the ControlNet without extra_parallel_modules."
        )
    return True


register_controlnet_family(
    "ZImageControlNetModel",
    ControlNetFamily("zimage", _zimage_plan, install=_install, condition_arg="control_context"),
)
