"""ControlNets in `extra_parallel_modules`: context parallel, sharing the transformer's split.

A ControlNet pipeline calls `controlnet(...)` first; it returns one residual per block over the image tokens, and
the pipeline hands them to the transformer, which adds them to its own hidden states block by block. Under
context parallelism the transformer holds only its shard of the image tokens, so the residuals must arrive split
exactly the same way. We run the ControlNet itself context parallel, with the transformer's own diffusers
ParallelConfig (same mesh, same sharder, same uneven-split mode), splitting the same image sequence, and leave
its residual outputs sharded: no gather, no communication beyond its attention, and each rank's residual rows are
the rows its transformer shard holds, by construction.

Each family's plan is data in diffusers' `_cp_plan` format (below, or in `controlnet_<family>.py`; Flux and
QwenImage mirror the installed release's transformer plan), applied with diffusers' split and gather hooks
(`apply_input_splits`); the residuals are never gathered. Multi-ControlNet wrappers
(`FluxMultiControlNetModel`, `QwenImageMultiControlNetModel`, `SD3MultiControlNetModel`) are handled through their
`nets`: every net gets the plan, and the wrapper's sum of residuals is a sum of equally sharded tensors.

A ControlNet parallelized this way returns sharded residuals: it is meant to be called by its pipeline, whose
transformer is parallelized by the same `enable_cache` call. `ulysses_size` / `ring_size` are required (with
`tp_size` alone the transformer sees the whole sequence, and so must the ControlNet: leave it out).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from diffpar.compat import diffusers_cp_hooks
from diffpar.compat.diffusers_cp_hooks import split_input
from diffpar.errors import DiffparError, UnsupportedError
from diffpar.engines.tensor_parallel import apply_tensor_parallel
from diffpar.families.registry import ClassRegistry, ExtraModuleAdapter, register_extra_adapter
from diffpar.families.transformers.tp_plans import diffpar_tp_plan_for, shard_plan_for
from diffpar.plan_types import ComponentPlan

MULTI_WRAPPERS = ("FluxMultiControlNetModel", "QwenImageMultiControlNetModel", "SD3MultiControlNetModel")


@dataclass
class ControlNetFamily:
    """How one ControlNet class runs context parallel."""

    name: str
    # net -> plan in diffusers' _cp_plan format (splits; gathers only inside the ControlNet, never of residuals)
    plan: Callable[[torch.nn.Module], dict]
    # (net, cp_config) -> [(module, hook_name, diffusers ModelHook)] for splits a plan cannot express
    extra_hooks: Callable[[torch.nn.Module, object], list] | None = None
    # (net, config) -> None, or raise with what to do (local, no collectives). Default: the transformer's
    # context-parallel check (processors that take a parallel config, backend, head counts).
    check: Callable[[torch.nn.Module, object], None] | None = None
    # (net, config, handle, label): forward changes the plan needs (e.g. SD3's attention processors), undoable
    prepare: Callable | None = None
    # (net, cp_config, handle, label): hooks a plan cannot express, installed with their own undo steps
    install: Callable | None = None
    # the forward argument holding the condition (a tensor or a list of tensors), broadcast from rank 0
    condition_arg: str = "controlnet_cond"


CONTROLNET_FAMILIES: ClassRegistry[ControlNetFamily] = ClassRegistry("ControlNet family")


def register_controlnet_family(class_name: str, family: ControlNetFamily) -> ControlNetFamily:
    return CONTROLNET_FAMILIES.register((class_name,), family)


def family_for(net: torch.nn.Module) -> ControlNetFamily | None:
    return CONTROLNET_FAMILIES.lookup(net)


def inner_nets(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The ControlNets a module runs: itself, or every net of a Multi wrapper (each once)."""
    if type(module).__name__ in MULTI_WRAPPERS or (
        hasattr(module, "nets") and isinstance(module.nets, torch.nn.ModuleList)
    ):
        seen, nets = set(), []
        for net in module.nets:
            if id(net) not in seen:
                seen.add(id(net))
                nets.append(net)
        return nets
    return [module]


# ------------------------------------------------------------------------------------------------------------
# Plans (data)
# ------------------------------------------------------------------------------------------------------------


def mirror_transformer_plan(transformer_class: str) -> dict:
    """The installed release's `_cp_plan` of the transformer a ControlNet feeds, without its output gathers.

    A ControlNet's forward mirrors its transformer's in every release (same argument and submodule names up to the
    blocks), so splitting where the transformer splits, in that release, gives the transformer's split.
    """
    import diffusers

    plan = diffusers_cp_hooks.native_cp_plan(getattr(diffusers, transformer_class, None))
    if not plan:
        raise UnsupportedError(
            f"the installed diffusers has no context-parallel plan for {transformer_class}, so diffpar cannot mirror "
            "it on the ControlNet. Install diffusers>=0.36.0."
        )
    return {k: v for k, v in plan.items() if not diffusers_cp_hooks.is_gather_entry(v)}


def _flux_plan(net) -> dict:
    # FluxTransformer2DModel's root splits: image tokens, prompt tokens and their RoPE ids, each on its own. The
    # condition joins the image stream through controlnet_x_embedder: split at its input, which is (B, image
    # tokens, C) both for packed latents and after input_hint_block's patchify.
    plan = {k: dict(v) for k, v in mirror_transformer_plan("FluxTransformer2DModel").items()}
    plan["controlnet_x_embedder"] = {"input": split_input(split_dim=1, expected_dims=3)}
    if net.union:  # the prompt is split at the blocks instead (see union_prompt_split_hook)
        for name in ("encoder_hidden_states", "txt_ids"):
            plan[""].pop(name, None)
    return plan


def union_prompt_split_hook(cp_config):
    """A hook for each block of a union Flux ControlNet.

    Union ControlNets put a mode token in front of the prompt inside forward, after any root split could run. So
    the prompt is split at the blocks instead: the first block splits the whole prompt (later ones receive it split
    already), and every block gets the prompt rows of the rotary embedding split likewise (`pos_embed` computed it
    for [whole prompt, image shard]). Image tokens are split at the root as usual.
    """

    def split_prompt(arguments):
        hidden = arguments.get("hidden_states")
        prompt = arguments.get("encoder_hidden_states")
        rotary = arguments.get("image_rotary_emb")
        prompt_len = rotary[0].shape[0] - hidden.shape[1]
        if prompt.shape[1] == prompt_len:
            arguments.set("encoder_hidden_states", shard(prompt, 1, cp_config))
        arguments.set("image_rotary_emb",
                      tuple(torch.cat([shard(r[:prompt_len], 0, cp_config), r[prompt_len:]], dim=0) for r in rotary))

    return diffusers_cp_hooks.argument_rewriting_hook(split_prompt)


def shard(tensor: torch.Tensor, dim: int, cp_config) -> torch.Tensor:
    """This rank's part of `tensor`, exactly as diffusers' context-parallel input hooks cut it."""
    return diffusers_cp_hooks.shard(tensor, dim, cp_config)


def _flux_extra_hooks(net, cp_config) -> list:
    if not net.union:
        return []
    hooks = []
    for container in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(net, container)):
            hooks.append((block, f"diffpar_union_prompt_split---{container}.{i}", union_prompt_split_hook(cp_config)))
    return hooks


def _qwenimage_plan(net) -> dict:
    # QwenImageTransformer2DModel's plan, without its output gather: 0.42 splits the streams entering block 0
    # (after img_in + controlnet_x_embedder ran on the whole sequence), 0.36 at the root; the RoPE tables as
    # pos_embed returns them; the prompt mask where the transformer splits it.
    plan = mirror_transformer_plan("QwenImageTransformer2DModel")
    if "hidden_states" in plan.get("", {}):
        # Split at the root (0.36): the condition is added right after img_in, so it is split as it enters.
        plan["controlnet_x_embedder"] = {"input": split_input(split_dim=1, expected_dims=3)}
    return plan


register_controlnet_family("FluxControlNetModel", ControlNetFamily("flux", _flux_plan, _flux_extra_hooks))
register_controlnet_family("QwenImageControlNetModel", ControlNetFamily("qwenimage", _qwenimage_plan))


# ------------------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------------------


class ControlNetAdapter(ExtraModuleAdapter):
    kind = "controlnet"

    def matches(self, module: torch.nn.Module) -> bool:
        nets = inner_nets(module)
        return bool(nets) and all(family_for(n) is not None for n in nets)

    def plan(self, module: torch.nn.Module, name: str, world_size: int, config) -> ComponentPlan:
        from diffpar.engines.context_parallel import check_context_parallel

        nets = inner_nets(module)
        # Under tp_size, a ControlNet whose blocks have a tensor-parallel plan (Flux, Qwen-Image: the transformer's
        # own) is sharded over the same "tp" ranks by the one TP engine; its residuals come out whole per token.
        shard_plans = [None] * len(nets)
        if config.tp_degree > 1:
            for i, net in enumerate(nets):
                if diffpar_tp_plan_for(net) is not None:
                    shard_plans[i] = shard_plan_for(net, config.tp_degree, world=world_size)
        if config.cp_degree <= 1 and any(p is None for p in shard_plans):
            unplanned = sorted({type(n).__name__ for n, p in zip(nets, shard_plans) if p is None})
            raise DiffparError(
                f"extra_parallel_modules: the ControlNet ({type(module).__name__}) runs context parallel on the "
                "transformer's split of the image tokens, which needs ulysses_size or ring_size > 1; this "
                f"configuration has none (tp_size={config.tp_degree}), and diffpar has no tensor-parallel plan for "
                f"{unplanned}. Set ulysses_size/ring_size, or remove the ControlNet from extra_parallel_modules (it "
                "then runs whole on every rank, which is correct when the transformer is not context parallel)."
            )
        families = []
        for net in nets:
            family = family_for(net)
            if config.cp_degree > 1:
                try:
                    (family.check or check_context_parallel)(net, config)
                except UnsupportedError as exc:
                    raise UnsupportedError(f"extra_parallel_modules: ControlNet {type(net).__name__}: {exc}") from None
            families.append(family)
        facts = {
            "class": type(module).__name__,
            "nets": [
                {"class": type(n).__name__, "params": sum(p.numel() for p in n.parameters()),
                 "union": bool(getattr(n, "union", False)), "tensor_parallel": p is not None}
                for n, p in zip(nets, shard_plans)
            ],
        }
        weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        per_rank = weight_bytes - sum(
            p.weight_bytes(n)["full"] - p.weight_bytes(n)["per_rank"] for n, p in zip(nets, shard_plans) if p is not None
        )
        engines = (["context parallel"] if config.cp_degree > 1 else []) + (
            ["tensor parallel"] if any(p is not None for p in shard_plans) else [])
        groups = (["the transformer's ring x ulysses"] if config.cp_degree > 1 else []) + (
            ["tp"] if any(p is not None for p in shard_plans) else [])
        details = []
        if config.cp_degree > 1:
            details.append("residuals stay sharded like the transformer's image tokens (no gather)")
        if any(p is not None for p in shard_plans):
            details.append("blocks split over tp like the transformer's (heads, MLP features; one all-reduce each)")
        details.append("condition broadcast from rank 0 at every call" if config.broadcast_latents else
                       "condition used as each rank passes it (broadcast_latents=False)")
        whole = [] if all(p is not None for p in shard_plans) else [
            "weights of " + ", ".join(sorted({type(n).__name__ for n, p in zip(nets, shard_plans) if p is None}))
            + (" (no tensor-parallel plan: replicated across tp ranks)" if config.tp_degree > 1
               else " (replicated under context parallelism)")]
        return ComponentPlan(
            name=name, role="controlnet", module_class=type(module).__name__, engine=" + ".join(engines),
            group=" x ".join(groups), source=", ".join(f"{f.name} ControlNet plan" for f in families),
            details=tuple(details), facts=ComponentPlan.freeze_facts(facts),
            weight_bytes=weight_bytes, weight_bytes_per_rank=per_rank, whole=tuple(whole),
            payload=tuple(zip(nets, families, shard_plans)),
        )

    def apply(self, module, plan: ComponentPlan, group, handle, config, context):
        parallel_config = _denoiser_parallel_config(context) if config.cp_degree > 1 else None
        applied = {}
        for i, (net, family, shard_plan) in enumerate(plan.payload):
            label = f"{plan.name or 'controlnet'}" + (f".nets[{i}]" if net is not module else "")
            if parallel_config is not None:
                applied[label] = apply_controlnet_context_parallel(net, family, parallel_config, config, handle, label)
            if shard_plan is not None:
                apply_tensor_parallel(net, shard_plan, context.mesh["tp"], handle, label)
            if config.broadcast_latents:
                broadcast_condition(net, family.condition_arg, group, handle, label)
        return applied


def broadcast_condition(net, arg: str, group, handle, label: str) -> None:
    """Every rank's ControlNet must see rank 0's condition.

    Pipelines may draw the condition's latent from the global RNG (StableDiffusion3ControlNetPipeline samples the
    VAE posterior without a generator): ranks seeded differently would condition their shards on different images.
    A plain torch pre-hook broadcasts it at each call (one condition-sized message per step); `broadcast_latents=
    False` turns this off together with the latent broadcast.
    """
    import torch.distributed as dist

    position = list(inspect.signature(type(net).forward).parameters).index(arg) - 1  # without self
    src = dist.get_global_rank(group, 0) if group is not None and group != dist.group.WORLD else 0

    def from_rank0(value):
        if isinstance(value, torch.Tensor):
            buf = value.detach().clone(memory_format=torch.contiguous_format)
            dist.broadcast(buf, src=src, group=group)
            return buf
        if isinstance(value, (list, tuple)):
            return type(value)(from_rank0(v) for v in value)
        return value

    def hook(module, args, kwargs):
        if arg in kwargs:
            kwargs[arg] = from_rank0(kwargs[arg])
        elif position < len(args):
            args = args[:position] + (from_rank0(args[position]),) + args[position + 1:]
        return args, kwargs

    removables = []
    handle.add(f"{label}: broadcast the condition from rank 0", lambda: [r.remove() for r in removables])
    removables.append(net.register_forward_pre_hook(hook, with_kwargs=True))


def _denoiser_parallel_config(context):
    configs = context.denoiser_parallel_configs
    denoiser = "transformer" if "transformer" in configs else (next(iter(configs)) if len(configs) == 1 else None)
    if denoiser is None:
        raise DiffparError(
            "extra_parallel_modules: the ControlNet needs the transformer to be context parallel in the same "
            f"enable_cache call (found context-parallel denoisers: {sorted(configs)}). Pass the pipeline and "
            "ulysses_size/ring_size."
        )
    return configs[denoiser]


def apply_controlnet_context_parallel(net, family: ControlNetFamily, parallel_config, config, handle, label: str):
    """Context-parallel hooks on one ControlNet with the transformer's ParallelConfig; every step records its undo
    before it is made."""
    from diffpar.engines.context_parallel import attach_parallel_config

    if family.prepare is not None:
        family.prepare(net, config, handle, label)
    attach_parallel_config(net, parallel_config, config, handle, label)

    cp_config = parallel_config.context_parallel_config
    plan = family.plan(net)
    handle.add(f"{label}: context-parallel input splits ({family.name} ControlNet plan)",
               lambda: diffusers_cp_hooks.remove_plan_hooks(net, plan))
    diffusers_cp_hooks.register_input_split_hooks(net, cp_config, plan)

    extra = family.extra_hooks(net, cp_config) if family.extra_hooks else []
    registered = []

    def remove_extra():
        for module, hook_name in reversed(registered):
            diffusers_cp_hooks.remove_named_hook(module, hook_name)
        registered.clear()

    if extra:
        handle.add(f"{label}: {family.name} ControlNet split hooks", remove_extra)
    for module, hook_name, hook in extra:
        registered.append((module, hook_name))
        diffusers_cp_hooks.register_named_hook(module, hook, hook_name)
    if family.install is not None:
        family.install(net, cp_config, handle, label)
    return {"family": family.name, "plan": plan}


def check_controlnet_listed(pipeline, config, extra_names) -> None:
    """For api.py's local checks: a context-parallel transformer with an unlisted ControlNet would receive
    whole-sequence residuals and fail at the first step with a shape error. Say so before any collective."""
    if config.cp_degree <= 1 or not hasattr(pipeline, "components"):
        return
    for attr, module in pipeline.components.items():
        if not isinstance(module, torch.nn.Module) or attr in extra_names:
            continue
        nets = inner_nets(module)
        if nets and all(family_for(n) is not None for n in nets):
            raise DiffparError(
                f"this {type(pipeline).__name__} has a ControlNet ({attr}: {type(module).__name__}) that is not in "
                "extra_parallel_modules. With ulysses_size/ring_size the transformer holds a shard of the image "
                "tokens, and the ControlNet's residuals must be split the same way. Add it: "
                f"parallel_kwargs={{'extra_parallel_modules': [pipe.{attr}, ...]}}."
            )


register_extra_adapter(ControlNetAdapter())
