"""Apply a `ParallelPlan` that every rank agreed on, step by step, each step's undo recorded before its change.

1. Setup (collectives, no change to any module): the ("dp" or "cfg", "ring", "ulysses", "tp") mesh and the sub-groups the
   engines need (the model-copy group the cache agrees over).
2. Local steps, in this order, no collective: the cache (before the context-parallel hooks: diffusers nests the
   hook registered last outermost, and plans that split the sequence in a hook on block 0 - QwenImage, Z-Image -
   must split before a cache hook on that block measures it), each denoiser's context- then tensor-parallel
   engine, the cfg/batch split over the outer groups (outside those hooks), each extra module's engine, the latent
   broadcast, the call agreement.
3. One status collective: a rank whose step failed brings every rank down with the same error, and all roll back
   together (until `commit`, every undo is local: weights a rollback needs are still held).
"""
from __future__ import annotations

import hashlib
import inspect
import logging

import torch
import torch.distributed as dist

from diffpar import mesh as mesh_lib
from diffpar.cache import apply_cache
from diffpar.components import is_pipeline
from diffpar.engines import sharded_loading
from diffpar.engines import tensor_parallel
from diffpar.engines.call_agreement import CallChecker, attach_model_checker, attach_pipeline_checker
from diffpar.engines.cfg_parallel import apply_cfg_parallel
from diffpar.engines.context_parallel import apply_context_parallel, new_parallel_config
from diffpar.errors import DiffparError
from diffpar.handle import ParallelHandle
from diffpar.patch import Patch
from diffpar.plan_types import ApplyContext, ParallelPlan

logger = logging.getLogger("diffpar")

# The named steps, in order (tests inject failures into each of them).
APPLY_STEPS = ("cache", "context parallel", "tensor parallel", "cfg parallel", "extra module", "latent broadcast",
               "call agreement")


def model_group(mesh, layout, world=None):
    """The process group of the ranks that hold one copy of the denoiser, or None when each process holds a
    whole copy. Creating a sub-group is a collective: call it during setup, on every rank. `world`: the whole world
    as a group whose waits end after timeout_s (`mesh.world_group`); default: the default group."""
    if layout is None or layout.model_degree == 1:
        return None
    if layout.dp == 1:
        return world if world is not None else dist.group.WORLD
    # Several model copies (dp > 1): agree within this copy only; other copies decide for their own inputs.
    return mesh["ring", "ulysses", "tp"]._flatten().get_group()


def cache_decision_group(mesh, layout, cfg_plans, world=None):
    """Where a cache's skip decision is agreed: the model copy, or the whole world when the batch of each forward
    is split over the cfg/dp groups (planning.cache_group_size says why). A collective: setup only."""
    if any(c.payload.mode == "batched" for c in cfg_plans):
        return world if world is not None else dist.group.WORLD
    return model_group(mesh, layout, world)


def apply_plan(target, plan: ParallelPlan, config, handle: ParallelHandle) -> None:
    """Carry out `plan` on this rank. Every rank must call it after the agreement (it creates process groups)."""
    layout = plan.layout
    cache_plans = plan.by_role("cache")
    if layout is None:  # one process: only the cache, which needs no agreement
        for component in cache_plans:
            handle.states["cache"] = apply_cache(component, handle, None)
        return

    mesh_lib.track_handle(handle)  # its engines' state is dropped at exit, before the process groups are freed
    # 1. Setup: collectives only.
    cfg_plans = plan.by_role("cfg")
    cfg_degree = layout.dp if any(c.payload.dim == "cfg" for c in cfg_plans) else 1
    dims = mesh_lib.ParallelDims(layout.world_size, layout.ulysses, layout.ring, layout.tp, cfg_degree)
    world_mesh = dims.build(config.timeout_s)  # every group of the mesh carries timeout_s
    # On a whole-world group carrying timeout_s: the user may have started the default group with torch's 30 min.
    cache_group = (cache_decision_group(world_mesh, layout, cfg_plans, mesh_lib.world_group(config.timeout_s))
                   if cache_plans else None)
    outer_group = world_mesh[dims.outer_name].get_group() if cfg_plans else None
    handle.states["mesh"] = world_mesh
    if layout.dp > 1 and not cfg_plans:
        per_group = layout.world_size // layout.dp
        groups = [f"{g * per_group}-{(g + 1) * per_group - 1}" if per_group > 1 else str(g) for g in range(layout.dp)]
        logger.warning(
            "diffpar: model degrees use %d of %d ranks; each of the %d dp groups (ranks %s) computes the same "
            "transformer calls (redundant). cfg_size=2 on a guided pipeline, larger ulysses/ring/tp degrees, or a "
            "batch split (see the plan's note) would use them.",
            per_group, layout.world_size, layout.dp, " / ".join(groups),
        )

    # 2. Local steps; a failure is carried to the status collective below.
    local_error = None
    try:
        _apply_local_steps(target, plan, config, handle, world_mesh, cache_group, outer_group)
    except Exception as exc:  # every rank must still reach the status collective
        local_error = exc

    # 3. Status: all succeeded, or every rank raises (and enable_cache rolls each one back).
    mesh_lib.agree("diffpar.enable_cache", {}, local_error,
                   failed="failed while applying the agreed plan, so every rank rolled back", timeout_s=config.timeout_s)


def _apply_local_steps(target, plan: ParallelPlan, config, handle, world_mesh, cache_group, outer_group) -> None:
    for component in plan.by_role("cache"):
        handle.states["cache"] = apply_step("cache", apply_cache, component, handle, cache_group)
    context = ApplyContext(pipeline=target if is_pipeline(target) else None, mesh=world_mesh)
    for component in plan.by_role("denoiser"):
        payload = component.payload
        if payload.cp_plan is not None:
            parallel_config = new_parallel_config(payload.cp_kwargs, world_mesh["ring", "ulysses"])
            apply_step("context parallel", apply_context_parallel, payload.module, payload.cp_plan, config,
                       parallel_config, handle, component.name, prepare=payload.cp_prepare,
                       tokens=payload.cp_tokens)
            context.denoiser_parallel_configs[component.name] = parallel_config
        if payload.tp_engine is not None:
            apply_step("tensor parallel", tensor_parallel.apply_tensor_parallel, payload.module, payload.tp_plan,
                       world_mesh["tp"], handle, component.name)
    # After the context- and tensor-parallel hooks, so the split wraps them: each cfg/dp group is its own mesh.
    for component in plan.by_role("cfg"):
        handle.states["cfg"] = apply_step("cfg parallel", apply_cfg_parallel, component.payload, outer_group, handle,
                                          config.timeout_s)
    for component in plan.components:
        if component.role in ("denoiser", "cache", "cfg", "weights"):
            continue
        extra = component.payload
        # The whole world, as a group whose collectives end after timeout_s (the user may have started the default
        # group with torch's own timeout).
        state = apply_step("extra module", extra.adapter.apply, extra.module, extra.plan,
                           mesh_lib.world_group(config.timeout_s), handle, config, context)
        if state is not None:
            handle.states[component.name] = state
    # After the engines that replace layers by (meta) shards: each rank reads exactly what its shards hold.
    for component in plan.by_role("weights"):
        load = component.payload
        rank = world_mesh["tp"].get_local_rank() if load.rank_group == "tp" else (
            dist.get_rank() if load.rank_group == "world" else 0)
        # Not through apply_step: the shared rollback cases (tests/test_rollback.py) build loaded pipelines, where
        # this step never runs; tests/test_sharded_loading.py injects the same failures (right after this step, on
        # one rank or all, and inside it) on a pipeline built by diffpar.empty_pipeline.
        handle.states[f"weights:{component.name}"] = sharded_loading.apply_loading(load, rank, handle)
    if config.broadcast_latents and is_pipeline(target) and hasattr(target, "prepare_latents"):
        apply_step("latent broadcast", broadcast_latents, target, handle, mesh_lib.world_group(config.timeout_s))
    if config.check_every_call or (config.broadcast_latents and is_pipeline(target)):
        apply_step("call agreement", attach_call_checker, target, plan, config, handle)


def attach_call_checker(target, plan: ParallelPlan, config, handle) -> None:
    """Every later call of the pipeline (or bare model) starts with one small exchange of its arguments; with
    `verify_weights`, also of the weights of every module that is not sharded (sharded ones differ by design)."""
    weights = {}
    if config.verify_weights:
        for c in plan.components:
            module = getattr(c.payload, "module", None)
            sharded = c.role == "text encoder" or getattr(c.payload, "tp_plan", None) is not None
            if module is not None and not sharded:
                weights[c.name] = module
    label = f"{type(target).__name__}" + ("(...)" if is_pipeline(target) else ".forward")
    checker = CallChecker(label, None, weights, config.timeout_s, check_arguments=config.check_every_call)
    if is_pipeline(target):
        if config.broadcast_latents:  # every random draw of the call agrees across ranks
            checker.random_streams = random_state_step(target, mesh_lib.world_group(config.timeout_s))
        # Pipelines draw their noise in prepare_latents (a settle point); one without it draws inline: no overlap.
        checker.pipeline_can_defer = hasattr(target, "prepare_latents")
        add_settle_points(plan, handle)
        attach_pipeline_checker(target, checker, handle)
    else:
        attach_model_checker(target, checker, handle)
    handle.states["call_checker"] = checker


def _settle_before_forward(module, args):
    if not torch.compiler.is_compiling():  # traced, it would be a no-op anyway: compiled calls do not defer
        mesh_lib.settle_deferred()


def add_settle_points(plan: ParallelPlan, handle: ParallelHandle) -> None:
    """A pipeline call's exchange is settled before the first forward of each parallel module, ahead of that
    module's own hooks (their collectives need the ranks agreed). Not text encoders: their collectives (tensor
    parallel layers) settle it themselves, so the exchange also overlaps their embedding and first projections."""
    for component in plan.components:
        module = getattr(component.payload, "module", None)
        if not isinstance(module, torch.nn.Module) or component.role in ("text encoder", "weights", "cache"):
            continue
        hook = module.register_forward_pre_hook(_settle_before_forward, prepend=True)
        handle.add(f"{component.name}: settle the call agreement before its forward", hook.remove)


def apply_step(step: str, fn, *args, **kwargs):
    """Run one named apply step (the seam the failure-injection tests wrap)."""
    return fn(*args, **kwargs)


def _generators(value) -> list[torch.Generator]:
    if isinstance(value, torch.Generator):
        return [value]
    if isinstance(value, (list, tuple)):
        return [g for g in value if isinstance(g, torch.Generator)]
    return []


def _generator_argument(wrapped, args, kwargs):
    if "generator" in kwargs:
        return kwargs["generator"]
    try:
        return inspect.signature(wrapped).bind_partial(*args, **kwargs).arguments.get("generator")
    except (TypeError, ValueError):
        return None


def _random_states(generators: list[torch.Generator], with_cuda: bool) -> list[torch.Tensor]:
    """The states of every random stream a pipeline call may draw from: the call's generators, torch's global CPU
    generator and, on NCCL (every rank on its GPU), the current device's (pipelines that pass no generator, e.g. a
    VAE posterior sample, draw from those). The same streams on every rank: chosen by the backend, which all ranks
    share, not by each process's CUDA state."""
    states = [g.get_state() for g in generators]
    states.append(torch.default_generator.get_state())  # torch.get_rng_state's own call, one Python frame less
    if with_cuda:
        states.append(torch.cuda.get_rng_state())
    return states


def streams_payload_bytes(with_cuda: bool) -> int:
    """Room for the random states in each call's exchange: one CPU generator's state beside torch's global CPU
    state (and the current GPU's, on NCCL): the states of the common call, one generator (a GPU generator's state
    is smaller than a CPU one's). The same on every rank: the same torch, the backend all ranks share."""
    cpu = torch.Generator().get_state().numel()
    return 2 * cpu + (torch.cuda.get_rng_state().numel() if with_cuda else 0)


def _state_setters(generators: list[torch.Generator], with_cuda: bool) -> list:
    """What sets each of `_random_states`' streams, in the same order (needed only when states must change)."""
    setters = [g.set_state for g in generators]
    setters.append(torch.set_rng_state)
    if with_cuda:
        setters.append(torch.cuda.set_rng_state)
    return setters


def _streams_device(group) -> torch.device | None:
    """Where the random states travel: NCCL moves device tensors only; None: on the CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def _broadcast_streams(states: list[torch.Tensor], setters: list, group, device) -> None:
    flat = torch.cat([state.reshape(-1) for state in states])
    buf = flat if device is None else flat.to(device)
    dist.broadcast(buf, src=0, group=group)
    if dist.get_rank() != 0:
        buf = buf.cpu()
        offset = 0
        for state, set_state in zip(states, setters):
            set_state(buf[offset:offset + state.numel()].clone())
            offset += state.numel()


def streams_digest(states: list[torch.Tensor]) -> int:
    """62 bits telling the random states' bytes apart (equal states, equal digest, on every rank): blake2b over
    each state's bytes in place (generator states are contiguous uint8 tensors already: no copy). The call's
    description is fingerprinted with the same hash: at a call's start the caches are cold from the previous call,
    and each distinct hashing routine touched there costs more than hashing itself (a describe that takes 13 us
    warm took 71 us first in the call, measured on 2 gloo CPU ranks)."""
    digest = hashlib.blake2b(digest_size=8)
    for state in states:
        digest.update(state.numpy() if state.dtype == torch.uint8 else state.contiguous().view(torch.uint8).numpy())
    return int.from_bytes(digest.digest(), "little") >> 2


class CallRandomStreams:
    """The random streams one pipeline call may draw from, on this rank (their `states` at the call's start), and
    what the call's agreement carries about them. The states themselves travel in the exchange when they fit its
    room (`payload_bytes`: one generator beside torch's global ones, the common call): every rank compares every
    rank's bytes with rank 0's exactly and takes rank 0's from the same exchange, no digest and no broadcast. More
    generators than that (a list for a batch): their total size and a digest travel instead, and rank 0's states
    are broadcast only when the digests differ, the sizes being known equal from the same exchange."""

    def __init__(self, generators: list[torch.Generator], group, latents: torch.Tensor | None, device=None,
                 payload_bytes: int = 0):
        self.group = group
        self.device = device  # where broadcast states travel (`_streams_device`, found once per pipeline)
        self.generators = generators
        self.payload_bytes = payload_bytes
        self.states = _random_states(generators, with_cuda=device is not None)
        size = sum([state.nbytes for state in self.states])  # 1-D uint8 tensors (`len` is a Python method)
        self.payload = self.states if size <= payload_bytes else None  # sent in the exchange itself
        # (total bytes, whether they travel in the exchange, their digest when they do not)
        self.values = (size, 1, 0) if self.payload is not None else (size, 0, streams_digest(self.states))
        self.latents = latents  # passed to a pipeline without prepare_latents: broadcast with the call
        # States in the exchange: whether this rank's differ from rank 0's. Digests: whether any rank's differ (every
        # rank finds the same, as the broadcast that follows needs).
        self.differ = True
        self._rank0_states = None  # rank 0's states, taken from the exchange (payload) when this rank's differ
        self._at_speculation = None  # the states where the call drew its noise before settling (`mark_speculation`)

    def _setters(self) -> list:
        return _state_setters(self.generators, with_cuda=self.device is not None)

    def after_agreement(self, table: list[tuple[int, ...]], payloads=None) -> None:
        """Every rank's values, the same table on every rank (and every rank's payload bytes, when the states
        travelled in the exchange; None: every rank's row was the same, byte for byte, states and all): every rank
        raises, or none does (`differ`: see `__init__`)."""
        if payloads is None and self.payload is not None:
            self.differ = False
            return
        if len({row[0] for row in table}) > 1 or len({row[1] for row in table}) > 1:
            raise DiffparError(
                f"diffpar: a pipeline call passed {len(self.generators)} generator(s) on rank {dist.get_rank()}, "
                "and another rank passed another number (or generators on another device): every rank must pass "
                "the same generators (each may seed its own; diffpar gives them rank 0's state)."
            )
        if self.payload is None:
            self.differ = len({row[2] for row in table}) > 1
            return
        # States in the exchange: only this rank's own comparison with rank 0's decides anything (what it sets, and
        # whether it restarts, alone), so the other ranks' rows are not compared.
        size = table[0][0]
        first = bytes(payloads[0][:size])  # compared as bytes: one memcmp (numpy's `==` cost 4x, caches cold)
        self.differ = bytes(payloads[dist.get_rank(self.group)][:size]) != first
        if self.differ:  # rank 0's states, split as this rank's are (the same sizes on every rank)
            flat, offset, self._rank0_states = torch.frombuffer(bytearray(first), dtype=torch.uint8), 0, []
            for state in self.states:  # each a tensor of its own: set_state reads its storage from the start
                self._rank0_states.append(flat[offset:offset + state.nbytes].clone())
                offset += state.nbytes

    def synchronize(self) -> None:
        if self.payload is not None:
            if self.differ:  # rank 0's states, from the exchange: no collective
                for state, set_state in zip(self._rank0_states, self._setters()):
                    set_state(state)
        elif self.differ:
            _broadcast_streams(self.states, self._setters(), self.group, self.device)
        if self.latents is not None:
            buf = self.latents if self.latents.is_contiguous() else self.latents.contiguous()
            dist.broadcast(buf, src=0, group=self.group)
            if buf is not self.latents:
                self.latents.copy_(buf)

    def must_restart(self) -> bool:
        """Whether the call must run again from rank 0's states: it drew before its agreement settled, from states
        that were not rank 0's. States in the exchange: this rank's own decision (its restart needs no collective;
        rank 0 never restarts). Else every rank decides alike (the restart broadcasts): some rank differed, and the
        same code on agreed arguments drew on every rank or on none."""
        if not self.differ:
            return False
        return self.drawn_since_start()

    def drawn_since_start(self) -> bool:
        """Whether any of the call's random streams moved since the call's start (a draw before the settle point).
        Every rank runs the same code on agreed arguments, so every rank finds the same."""
        return self._moved_from_start(_random_states(self.generators, with_cuda=self.device is not None))

    def _moved_from_start(self, states: list[torch.Tensor]) -> bool:
        return any(not torch.equal(before, after) for before, after in zip(self.states, states))

    def mark_speculation(self) -> None:
        """prepare_latents is about to draw before the exchange settles: the states now, so that a restart can tell
        whether the call drew before this point too (a few microseconds; compared only when a restart happens)."""
        self._at_speculation = _random_states(self.generators, with_cuda=self.device is not None)

    def drawn_before_speculation(self) -> bool:
        """Whether the call drew before its speculated noise (`mark_speculation`): a draw before prepare_latents,
        from this rank's own states, whether or not the exchange had arrived by then."""
        return self._at_speculation is not None and self._moved_from_start(self._at_speculation)

    def restart_from_rank0(self) -> None:
        """Before a call runs again (`_RestartCall`): every stream set to rank 0's state at the call's start (taken
        from the exchange, or one broadcast after putting this rank's own back), so the second run draws exactly
        what rank 0's first run drew."""
        setters = self._setters()
        if self.payload is not None:
            for state, set_state in zip(self._rank0_states, setters):
                set_state(state)
        else:
            for state, set_state in zip(self.states, setters):
                set_state(state)
            _broadcast_streams(self.states, setters, self.group, self.device)
        self.differ = False


_PLAIN_INPUTS = (bool, int, float, str, torch.dtype, torch.device, torch.Generator)


def _drawn_only(args: tuple, kwargs: dict) -> bool:
    """Whether prepare_latents was given only plain values (None, numbers, strings, dtypes, devices, generators,
    and lists of those): what it returns then comes from the call's agreed arguments and random draws alone, the
    same on every rank. Anything else (a tensor, an image) may hold values no agreement compared."""
    for value in (*args, *kwargs.values()):
        if value is None or isinstance(value, _PLAIN_INPUTS):
            continue
        if isinstance(value, (list, tuple)) and all(v is None or isinstance(v, _PLAIN_INPUTS) for v in value):
            continue
        return False
    return True


def random_state_step(pipe, group=None):
    """What the call agreement (engines.call_agreement's `random_streams`) asks at the start of every call of
    `pipe`: the call's random streams (`CallRandomStreams`), made rank 0's on every rank; `latents` passed to a
    pipeline without `prepare_latents` (whose broadcast covers them otherwise) are broadcast from rank 0 too."""
    inline_latents = not hasattr(pipe, "prepare_latents")
    device = _streams_device(group)
    room = streams_payload_bytes(with_cuda=device is not None)

    def streams(wrapped, args, kwargs) -> CallRandomStreams:
        latents = kwargs.get("latents") if inline_latents else None
        return CallRandomStreams(_generators(_generator_argument(wrapped, args, kwargs)), group,
                                 latents if isinstance(latents, torch.Tensor) else None, device, room)

    return streams


def broadcast_latents(pipe, handle: ParallelHandle, group=None) -> None:
    """Every rank must start from rank 0's noise, also when the user passed `latents` of their own. Random states
    are made rank 0's at the start of each call (`random_state_step`), so noise drawn from them inside a call is
    rank 0's already: the broadcast is left out when prepare_latents was given nothing but plain values (sizes,
    dtype, device, generators; `_drawn_only`) inside a call whose random streams are agreed. It still runs for
    latents or images passed in (their values are not compared, only their shapes) and for a call of
    prepare_latents outside a pipeline call. Saves FLUX two broadcasts per call (the latents and their position
    ids). `group`: the whole world (one whose waits end after timeout_s; default: the default group)."""

    def wrapper(wrapped, instance, args, kwargs):
        checker = handle.states.get("call_checker")
        if (checker is not None and mesh_lib.deferred_pending() and _drawn_only(args, kwargs)
                and checker.may_draw_before_settling()):
            # Drawn from this rank's states before they are agreed: when they differ from rank 0's, this rank runs
            # the call again from rank 0's (at the settle point); equal, the noise is rank 0's already.
            return wrapped(*args, **kwargs)
        mesh_lib.settle_deferred()  # the call's random states agreed before its noise is drawn
        result = wrapped(*args, **kwargs)
        if checker is not None and checker.streams_agreed and _drawn_only(args, kwargs):
            return result
        items = list(result) if isinstance(result, tuple) else [result]
        given = {t.data_ptr() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
        for i, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                if item.data_ptr() in given:  # the caller's own latents, passed through: received into a copy
                    item = items[i] = item.clone()
                buf = item if item.is_contiguous() else item.contiguous()
                dist.broadcast(buf, src=0, group=group)
                if buf is not item:
                    item.copy_(buf)
        return tuple(items) if isinstance(result, tuple) else items[0]

    patches: list[Patch] = []
    handle.add("pipeline: broadcast initial latents from rank 0", lambda: [p.undo() for p in patches])
    patches.append(Patch(pipe, "prepare_latents", wrapper, label=f"{type(pipe).__name__}.prepare_latents"))
