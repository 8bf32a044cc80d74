"""`diffpar.plan(...)`: the whole `ParallelPlan`, computed with no collective and no change to any module.

Resolve: which denoisers, which extra modules, which cache. For each, the family registry gives the plan (data)
and the engine's checks run here, once: head counts, widths, backends, what the installed release can do. The
result is immutable; `enable_cache` agrees on `plan.describe()` across ranks and then applies exactly this plan.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from diffpar.cache import plan_cache
from diffpar.compat import diffusers_cp, versions
from diffpar.components import find_denoisers, is_pipeline, resolve_extra_modules
from diffpar.config import ParallelismConfig
from diffpar.engines import sharded_loading, tensor_parallel
from diffpar.engines.call_agreement import weights_checksum
from diffpar.engines.cfg_parallel import BATCHED, TWO_CALLS, CfgPayload
from diffpar.engines.context_parallel import check_context_parallel
from diffpar.errors import DiffparError, UnsupportedError
import diffpar.families.catalog  # noqa: F401  (every family file registers itself: explicit, no package scan)
from diffpar.families.controlnets.base import check_controlnet_listed
from diffpar.families.pipelines.cfg import (
    batch_args_for,
    cfg_pattern_for,
    guidance_probe_for,
    recognised_pipelines,
)
from diffpar.families.registry import cp_plan_entry, cp_plan_for, extra_adapter_for, split_token_kind
from diffpar.families.transformers import tp_plans
from diffpar.mesh import ParallelDims
from diffpar.plan_types import ComponentPlan, MeshLayout, ParallelPlan


@dataclass(frozen=True)
class DenoiserPayload:
    """What the engines need for one denoiser: its context-parallel plan (diffusers' `_cp_plan` format) and
    the prepare step that plan needs, and its tensor-parallel shard plan (`tp_engine`: who wrote the plan it comes
    from, "diffusers" or "diffpar")."""

    module: torch.nn.Module
    cp_plan: dict | None = None
    cp_prepare: object = None
    cp_kwargs: dict | None = None  # diffusers' ContextParallelConfig arguments for the installed release
    tp_engine: str | None = None
    tp_plan: object = None
    cp_tokens: str | None = None  # what the split sequence counts, as the family says (for refusals)


@dataclass(frozen=True)
class ExtraPayload:
    module: torch.nn.Module
    adapter: object
    plan: ComponentPlan


def world_size_for_planning(world_size: int | None = None) -> int:
    """The world a plan is for: the given one, the running process group's, torchrun's WORLD_SIZE, else 1."""
    if world_size is not None:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise DiffparError(f"diffpar.plan: world_size must be a positive integer, got {world_size!r}.")
        return world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _dropout_in_training(module: torch.nn.Module) -> str | None:
    """Where `module` would draw random dropout masks (a Dropout with p > 0, or a config's attention/hidden
    dropout, while in training mode), or None."""
    if not module.training:
        return None
    for path, sub in module.named_modules():
        if isinstance(sub, torch.nn.modules.dropout._DropoutNd) and sub.p > 0:
            return f"{path or type(module).__name__} (p={sub.p})"
    config = getattr(module, "config", None)
    for key in ("attention_dropout", "dropout_rate", "hidden_dropout", "attention_probs_dropout_prob",
                "hidden_dropout_prob", "dropout"):
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return f"config.{key}={value}"
    return None


def check_eval_mode(name: str, module: torch.nn.Module) -> None:
    """A split module in training mode with dropout would draw a different mask on every rank (each rank's shard
    and the whole-sequence model disagree): refuse it, naming the dropout and the fix."""
    where = _dropout_in_training(module)
    if where is not None:
        raise DiffparError(
            f"{name} ({type(module).__name__}) is in training mode with dropout at {where}: split over ranks, every "
            f"rank would draw its own dropout mask, so the result would match neither one process nor another run. "
            f"Call {name}.eval() (from_pretrained already does) before enabling diffpar."
        )


def _ranks_will_agree() -> bool:
    """Whether this plan will be compared across running ranks: only then is a pass over every weight for the
    checksum worth its cost (a dry run or a one-process check has nothing to compare it with)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_offload(name: str, module: torch.nn.Module) -> None:
    """Refuse, before anything changes, a module whose sub-modules carry accelerate hooks: sequential CPU offload
    (`enable_sequential_cpu_offload`) or a `device_map` dispatch. Those keep weights on the meta device and move
    each leaf's weights in and out around its own forward, so diffpar cannot shard them (tensor parallelism, VAE
    split) and context parallelism under them is untested: on CPU it cannot be tested at all (accelerate 1.15 with
    torch 2.13 fails moving a weight back to meta, in one process too). A hook on the whole model
    (`enable_model_cpu_offload`) and diffusers' group offloading are supported (tests/test_offload.py)."""
    hooked = [path for path, sub in module.named_modules() if path and hasattr(sub, "_hf_hook")]
    if hooked:
        raise UnsupportedError(
            f"{name} ({type(module).__name__}) has accelerate hooks on its sub-modules ({', '.join(hooked[:3])}"
            f"{', ...' if len(hooked) > 3 else ''}): sequential CPU offload or a device_map. diffpar cannot split a "
            "model whose weights live on the meta device and move per layer. Use pipe.enable_model_cpu_offload() "
            "(supported with context parallelism and text-encoder tensor parallelism) or diffusers' group offloading "
            "(context parallelism), or load the model without device_map."
        )


def _weight_bytes(module: torch.nn.Module) -> int:
    """Bytes the parameters really store: a quantized weight its int8 / float8 data and scales, not its float dtype."""
    from diffpar.compat.quantized_tensors import storage_bytes

    return sum(storage_bytes(p) for p in module.parameters())


def _plan_denoiser(name: str, model: torch.nn.Module, config: ParallelismConfig, dims: ParallelDims) -> ComponentPlan:
    cp_plan = cp_prepare = cp_kwargs = tp_engine = tp_plan = cp_tokens = None
    engines, sources, details, whole = [], [], [], []
    whole_bytes = _weight_bytes(model)
    per_rank = whole_bytes
    if config.cp_degree > 1:
        cp_plan, source = cp_plan_for(model)
        entry = cp_plan_entry(model)
        cp_prepare = entry.prepare if entry is not None else None
        cp_tokens = split_token_kind(model)
        cp_kwargs = check_context_parallel(
            model, config, processors_come_with_plan=bool(entry and entry.prepare_installs_processors))
        engines.append("context parallel")
        sources.append(f"{source} _cp_plan" if source == "diffusers" else "diffpar _cp_plan")
        splits = [f"{k or 'forward'}({', '.join(map(str, v))})" for k, v in cp_plan.items() if isinstance(v, dict)]
        gathers = [k or "forward" for k, v in cp_plan.items() if not isinstance(v, dict)]
        if entry is not None:  # the family's own hooks (its prepare step) split or gather where no plan key shows
            splits += [f"{point} (family hook)" for point in entry.hook_splits]
            gathers += [f"{point} (family hook)" for point in entry.hook_gathers]
        details.append(f"sequence split over {dims.cp} ranks at: {'; '.join(splits)}")
        details.append(f"gathered at: {', '.join(gathers)}")
        whole.append("weights, across the context-parallel ranks (they split the sequence, not the parameters)")
    if config.tp_degree > 1:
        tp_plan = tp_plans.shard_plan_for(model, config.tp_degree, world=dims.world_size)
        tp_engine = tp_plan.origin  # "diffusers" (its _tp_plan, translated) or "diffpar"
        tensor_parallel.check_tensor_parallel(model, tp_plan, config)
        per_rank = tp_plan.weight_bytes(model)["per_rank"]
        engines.append("tensor parallel")
        sources.append(tp_plan.source)
        details.append(f"attention heads and MLP features split over tp {dims.tp}")
        whole.append("embeddings, norms and the output projection (small, replicated)")
    group = " x ".join(g for g, d in (("ring", dims.ring), ("ulysses", dims.ulysses), ("tp", dims.tp)) if d > 1)
    params = list(model.parameters())
    facts = {
        "class": type(model).__name__,
        "n_params": sum(p.numel() for p in params),
        "dtype": str(params[0].dtype) if params else None,
    }
    if _ranks_will_agree():  # ranks with different weights would blend them: refused by name
        facts["weights"] = weights_checksum(model)
    if dims.dp > 1:
        if dims.cfg > 1:
            details.append(f"{dims.dp} copies (cfg groups), each computing its share of every step (see cfg)")
        else:
            details.append(f"{dims.dp} copies (dp groups), each computing the whole denoiser for the same input")
    return ComponentPlan(
        name=name, role="denoiser", module_class=type(model).__name__,
        engine=" + ".join(engines) or "whole on every rank", group=group or "each rank alone",
        source=", ".join(sources), details=tuple(details), facts=ComponentPlan.freeze_facts(facts),
        weight_bytes=whole_bytes, weight_bytes_per_rank=per_rank, whole=tuple(whole),
        payload=DenoiserPayload(model, cp_plan, cp_prepare, cp_kwargs, tp_engine, tp_plan, cp_tokens),
    )


def plan(target, cache_config=None, parallelism_config: ParallelismConfig | None = None, *,
         world_size: int | None = None) -> ParallelPlan:
    """What diffpar would do to `target` (a pipeline or a model) on a world of `world_size` processes.

    Issues no collective and changes nothing, so it also runs in one plain Python process: pass `world_size=8`
    to check a configuration (degrees, heads, plans, extra modules, cache) before launching 8 GPUs.
    `print(plan)` shows which module gets what and the weight bytes per rank.
    """
    # Modules named in weights_from are built on the meta device on purpose: the engines' checks accept them.
    with sharded_loading.planning_loads(_modules_to_load(target, parallelism_config)):
        return _plan(target, cache_config, parallelism_config, world_size=world_size)


def _plan(target, cache_config, parallelism_config, *, world_size) -> ParallelPlan:
    if parallelism_config is not None and not isinstance(parallelism_config, ParallelismConfig):
        raise DiffparError(
            f"parallelism_config must be a diffpar.ParallelismConfig, got {type(parallelism_config).__name__}."
        )
    world = world_size_for_planning(world_size)
    config = parallelism_config
    components: list[ComponentPlan] = []
    notes: list[str] = []
    layout = None
    shims: tuple[str, ...] = ()
    model_group_size = 1
    if config is not None and world > 1:
        dims = ParallelDims(world, config.ulysses_degree, config.ring_degree, config.tp_degree, config.cfg_degree)
        layout = MeshLayout(world_size=world, dp=dims.dp, ring=dims.ring, ulysses=dims.ulysses, tp=dims.tp,
                            cfg=dims.cfg)
        model_group_size = dims.cp * dims.tp
        denoisers = find_denoisers(target)
        for name, model in denoisers:
            if dims.cp * dims.tp > 1:
                check_eval_mode(name, model)
                check_offload(name, model)
            components.append(_plan_denoiser(name, model, config, dims))
        cfg_component, cfg_note = _plan_cfg(target, denoisers, dims, cache_config is not None)
        if cfg_component is not None:
            components.append(cfg_component)
        extras = resolve_extra_modules(target, config.extra_parallel_modules)
        for name, module in extras:
            check_eval_mode(name, module)
            check_offload(name, module)
            adapter = extra_adapter_for(module)
            component = adapter.plan(module, name, world, config)
            if _ranks_will_agree():
                component = replace(component, facts=component.facts + (("weights", tuple(weights_checksum(module))),))
            components.append(_with_payload(component, ExtraPayload(module, adapter, component)))
        weights_from = sharded_loading.resolve_auto(config.weights_from, _named_modules(target)) \
            if config.weights_from else {}
        components.extend(_plan_weights(components, weights_from, config))
        if is_pipeline(target):
            check_controlnet_listed(target, config, {name for name, _ in extras})
        if config.cp_degree > 1 or any(c.role == "controlnet" for c in components):
            shims = tuple(diffusers_cp.SHARED_SHIMS.planned_names())
        if cfg_note:
            notes.append(cfg_note)
        if config.broadcast_latents and is_pipeline(target) and hasattr(target, "prepare_latents"):
            notes.append("initial latents broadcast from rank 0 (every rank starts from the same noise)")
    elif config is not None:
        find_denoisers(target)  # the same errors as a parallel launch for a target with no denoiser
        notes.append("one process: parallelism is a no-op (launch with torchrun --nproc_per_node=N)")
        if config.weights_from:
            notes.append("one process: weights_from is not applied (load the modules normally)")
    if cache_config is not None:
        components.append(plan_cache(target, cache_config, cache_group_size(components, model_group_size, world)))
    return ParallelPlan(
        target_class=type(target).__name__,
        layout=layout,
        components=tuple(components),
        shims=shims,
        notes=tuple(notes),
        config=ComponentPlan.freeze_facts(config.describe() if config is not None else {}),
        versions=ComponentPlan.freeze_facts(versions.describe()),
    )


def cache_group_size(components, model_group_size: int, world: int) -> int:
    """Ranks a cache's skip decision is agreed over: the ranks that compute one forward of the one-process model
    together. That is one model copy, unless the batch of each forward is split over the cfg/dp groups: then the
    measure is summed over every group too (the same sums as one process over the whole batch). Two-call guidance
    keeps one model copy: each branch has its own cache context, computed whole by its group."""
    split = [c for c in components if c.role == "cfg" and c.payload.mode == BATCHED]
    return world if split else model_group_size


def _plan_cfg(target, denoisers, dims: ParallelDims, with_cache: bool) -> tuple[ComponentPlan | None, str | None]:
    """The split over the outermost groups: guidance branches (cfg_size=2) or batches (dp groups), or None with
    the note that says why the dp groups stay redundant. Local checks only."""
    if dims.dp == 1:
        return None, None
    used = f"model degrees use {dims.world_size // dims.dp} of {dims.world_size} ranks"
    if dims.cfg == 1:
        batch_args = {name: batch_args_for(model) for name, model in denoisers}
        unknown = [type(m).__name__ for n, m in denoisers if batch_args[n] is None]
        redundant = f"each of the {dims.dp} dp groups computes the denoiser redundantly"
        known_loop = is_pipeline(target) and cfg_pattern_for(target) is not None
        if with_cache or unknown or not known_loop:
            if with_cache:
                why = "a cache decides from the whole batch"
            elif not known_loop:
                why = f"diffpar does not know what else {type(target).__name__} passes per sample"
            else:
                why = f"diffpar does not know which arguments of {', '.join(unknown)} carry the batch"
            return None, f"{used}: {redundant} ({why}; cfg_size=2 would split guidance where supported)"
        payload = CfgPayload(BATCHED, tuple((n, m, batch_args[n]) for n, m in denoisers), target, dim="dp")
        return _cfg_component(target, payload, dims), (
            f"{used}: batches split over the {dims.dp} dp groups; a batch smaller than {dims.dp} runs whole, so "
            f"{redundant} for it")
    name = type(target).__name__
    if not is_pipeline(target):
        raise DiffparError(
            f"cfg_size={dims.cfg}: the guidance branches are the pipeline's, so diffpar needs the pipeline: call "
            f"enable_cache(pipe, ...) rather than on the bare {name}."
        )
    pattern = cfg_pattern_for(target)
    if pattern is None:
        raise DiffparError(
            f"cfg_size={dims.cfg}: diffpar does not recognise how {name} runs classifier-free guidance (neither a "
            f"batched pattern nor cond/uncond calls are registered for {name} in "
            f"diffpar/families/pipelines/cfg.py; recognised: {', '.join(recognised_pipelines())}). Use cfg_size=1 "
            "and spread the ranks with ulysses_size / ring_size / tp_size."
        )
    entries = []
    for dname, model in denoisers:
        args = batch_args_for(model)
        if pattern == BATCHED and args is None:
            raise DiffparError(
                f"cfg_size={dims.cfg}: {name} batches its guidance branches, but diffpar does not know which "
                f"arguments of {dname} ({type(model).__name__}) carry the batch. Use cfg_size=1."
            )
        if pattern == TWO_CALLS and not callable(getattr(model, "cache_context", None)):
            raise DiffparError(
                f"cfg_size={dims.cfg}: {name} marks its guidance branches with {dname}.cache_context('cond' / "
                f"'uncond'), but {type(model).__name__} has no cache_context in this diffusers release. Use "
                "cfg_size=1."
            )
        entries.append((dname, model, args))
    if pattern == TWO_CALLS and not callable(getattr(target, "prepare_latents", None)):
        raise DiffparError(f"cfg_size={dims.cfg}: {name} has no prepare_latents, where each call would start.")
    payload = CfgPayload(pattern, tuple(entries), target, dim="cfg",
                         guided=guidance_probe_for(target) if pattern == TWO_CALLS else None)
    return _cfg_component(target, payload, dims), f"{used} per cfg group; the {dims.dp} cfg groups split guidance"


def _cfg_component(target, payload: CfgPayload, dims: ParallelDims) -> ComponentPlan:
    if payload.mode == BATCHED:
        engine = "batch parallel" if payload.dim == "dp" else "cfg parallel (batched branches)"
        details = [f"{n}: per-sample arguments {', '.join((*a.tensors, *a.lists))} split along the batch over "
                   f"{dims.dp} {payload.dim} groups, outputs all-gathered" for n, _, a in payload.denoisers]
    else:
        engine = "cfg parallel (two calls)"
        details = [f"{n}: cache_context('cond') calls on {payload.dim} group 0, ('uncond') on group 1; one "
                   "exchange of the prediction per step" for n, _, _ in payload.denoisers]
    facts = {"mode": payload.mode, "groups": dims.dp, "dim": payload.dim,
             "denoisers": {n: None if a is None else [list(a.tensors), list(a.lists)]
                           for n, _, a in payload.denoisers}}
    return ComponentPlan(
        name="cfg", role="cfg", module_class=type(target).__name__, engine=engine, group=payload.dim,
        source="diffpar families/pipelines/cfg.py", details=tuple(details),
        facts=ComponentPlan.freeze_facts(facts), payload=payload,
    )


def _named_modules(target) -> dict[str, torch.nn.Module]:
    named = dict(find_denoisers(target))
    if is_pipeline(target):
        named.update({n: m for n, m in target.components.items() if isinstance(m, torch.nn.Module)})
    return named


def _modules_to_load(target, config) -> list[torch.nn.Module]:
    if not isinstance(config, ParallelismConfig) or not config.weights_from:
        return []
    named = _named_modules(target)
    # Not required here: one process plans without loading (the error, if any, comes from _plan_weights).
    paths, _ = sharded_loading.split_request(sharded_loading.resolve_auto(config.weights_from, named, required=False))
    return [named[n] for n in paths if n in named]


def _plan_weights(components, weights_from: dict, config: ParallelismConfig) -> list[ComponentPlan]:
    """One "weights" component per module in `weights_from` ("auto" already resolved): what each rank reads of
    which file (every check of the files and of the meta module runs here; engines/sharded_loading.py)."""
    if not weights_from:
        return []
    paths, device = sharded_loading.split_request(weights_from)
    loadable = {c.name: c for c in components if c.role in ("denoiser", "text encoder")}
    out = []
    for name, path in paths.items():
        component = loadable.get(name)
        if component is None:
            raise DiffparError(
                f"weights_from names {name!r}, which is neither a denoiser nor a text encoder in "
                f"extra_parallel_modules here; it can load: {sorted(loadable)}.")
        if component.role == "denoiser":
            module, shards = component.payload.module, component.payload.tp_plan
            group = "tp" if shards is not None else "none"
        else:
            if config.keep_original_text_encoders:
                raise DiffparError(
                    f"weights_from[{name!r}] with keep_original_text_encoders=True: a text encoder loaded by shards "
                    "never had its full weights, so there is nothing to keep. Drop one of the two.")
            module, shards, group = component.payload.module, component.payload.plan.payload, "world"
        load = sharded_loading.plan_loading(name, module, path, shards, group, device)
        facts = sharded_loading.describe_plan(load)
        out.append(ComponentPlan(
            name=name, role="weights", module_class=type(module).__name__, engine="sharded loading",
            group=group, source="safetensors",
            details=(f"{facts['tensors']} tensors from {', '.join(facts['files'])}; {facts['sliced']} read as "
                     f"this rank's slice, the rest whole",),
            facts=ComponentPlan.freeze_facts(facts), weight_bytes=load.full_bytes,
            weight_bytes_per_rank=max(load.bytes_per_rank), payload=load))
    return out


def _with_payload(component: ComponentPlan, payload) -> ComponentPlan:
    return replace(component, payload=payload)
