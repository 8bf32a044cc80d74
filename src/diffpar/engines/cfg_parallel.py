"""Classifier-free guidance and batch parallelism: the outermost rank groups ("cfg", or "dp") each compute a
different part of every denoising step, and one exchange per step gives every rank the whole result.

Two mechanisms, both a wrapper on the denoiser's `forward`, applied after the context- and tensor-parallel hooks so
it sits outside them (each group is its own context-/tensor-parallel mesh and sees whole inputs):

- `batched`: the per-sample arguments (listed per denoiser class, `BatchArgs`) are split along dim 0 over the
  group, each group runs its part, and the outputs are all-gathered along dim 0. Samples are independent, so the
  split is exact; uneven parts are padded to the largest for the all-gather (gloo wants equal sizes) and trimmed.
  A batch smaller than the group runs whole on every group (said once).
- `two_calls`: the pipeline calls the denoiser twice per step, inside `cache_context("cond")` and
  `cache_context("uncond")`. Group 0 computes the cond call; group 1 returns at once a NaN placeholder of the
  learned output shape (the pipeline keeps that very tensor), then computes the uncond call; at the uncond call
  the two exchange [cond, uncond] and group 1 fills its placeholder in place. The placeholder needs the output's
  structure, shape and dtype, and group 1 needs to know that an uncond call will follow: the first pipeline call
  learns both in its first step, which every rank computes; a later call whose first cond call has inputs of the
  same shapes reuses the learned output template, and starts split from its first step when the pipeline says,
  before its first denoiser call, that guidance is on (`CfgPayload.guided`). A call without uncond (guidance 1, a
  distilled model) runs whole on every rank. A call sequence that breaks the learned or announced pattern raises
  on every rank (every rank sees the same calls and decides alike), never returns a blend.

Never imports a family: the plan (mode, batch arguments) comes in `CfgPayload`.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from diffpar.mesh import settle_deferred

from diffpar.engines.tp_shard import even_split
from diffpar.errors import DiffparError
from diffpar.patch import Patch

logger = logging.getLogger("diffpar")

BATCHED = "batched"
TWO_CALLS = "two_calls"


@dataclass(frozen=True)
class CfgPayload:
    """What `apply_cfg_parallel` carries out: the mode, each denoiser with its batch arguments (a `BatchArgs`-like
    object with `.tensors` and `.lists`, or None), the pipeline whose `prepare_latents` starts each call, and the
    name of the mesh dimension whose groups split the work ("cfg" or "dp")."""

    mode: str
    denoisers: tuple  # ((name, module, batch_args), ...)
    pipeline: object = None
    dim: str = "cfg"
    # two calls: guided(pipeline) -> True / False / None (unknown), asked as each pipeline call starts
    # (prepare_latents): True lets a call whose output template is known split from its first step.
    guided: object = None


class CfgPatternError(DiffparError):
    """The pipeline's calls broke the guidance pattern learned in its first step."""


@dataclass
class DenoiserCounters:
    """What one denoiser's wrapper did on this rank (tests and benchmarks read them)."""

    calls: int = 0  # forwards the pipeline made
    computed: int = 0  # forwards this rank ran
    placeholders: int = 0  # cond calls answered with a placeholder (group 1)
    split_from_first_step: int = 0  # pipeline calls split from their first step (a known template, guidance on)
    exchanges: int = 0  # collectives this wrapper issued
    bytes_sent: int = 0  # bytes this rank contributed to those collectives
    batches: list = field(default_factory=list)  # batch size of each forward this rank ran


@dataclass
class CfgRuntime:
    """`handle.state("cfg")`: the mode, the group, and per-denoiser counters."""

    mode: str
    group_size: int
    group_rank: int
    counters: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)  # what was said once (redundant ranks)

    def note_once(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            logger.warning("diffpar: %s", text)


def _wait(work, timeout_s: float, what: str) -> None:
    try:
        work.wait(timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise DiffparError(
            f"{what}: waited {timeout_s:.0f} s for the other cfg/dp group and it did not arrive (a rank that raised "
            f"or made a different call). ParallelismConfig(timeout_s=...) sets the wait. ({exc})"
        ) from None


def _all_gather(tensor: torch.Tensor, group, timeout_s: float, counters: DenoiserCounters, what: str):
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    settle_deferred()
    _wait(dist.all_gather(parts, tensor, group=group, async_op=True), timeout_s, what)
    counters.exchanges += 1
    counters.bytes_sent += tensor.numel() * tensor.element_size()
    return parts


# -- output structures: a tensor, a tuple/list of them, or a diffusers BaseOutput -------------------------------


def _map_tensors(output, fn):
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, (tuple, list)):
        return type(output)(_map_tensors(o, fn) for o in output)
    if isinstance(output, dict):  # diffusers BaseOutput is an OrderedDict dataclass
        return type(output)(**{k: _map_tensors(v, fn) for k, v in output.items()})
    return output


def _tensors(output) -> list[torch.Tensor]:
    found = []
    _map_tensors(output, lambda t: found.append(t) or t)
    return found


@dataclass(frozen=True)
class OutputTemplate:
    """A denoiser output's structure with its one tensor on the meta device (no memory), and that tensor's device:
    enough to build group 1's placeholder."""

    structure: object
    device: torch.device

    @classmethod
    def of(cls, output, tensor: torch.Tensor) -> "OutputTemplate":
        return cls(_map_tensors(output, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")), tensor.device)

    def placeholder(self) -> torch.Tensor:
        meta = _tensors(self.structure)[0]
        return torch.full(meta.shape, float("nan"), dtype=meta.dtype, device=self.device)

    def fill(self, tensor: torch.Tensor):
        return _map_tensors(self.structure, lambda _: tensor)


def _input_key(value):
    """What of a forward's arguments decides its output's structure, shape and dtype: every tensor's shape, dtype
    and device, and the plain values (return_dict, sizes, shape lists). Anything else counts by type only."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_input_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _input_key(v)) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))))
    return ("object", type(value).__qualname__)


# -- arguments as keywords ---------------------------------------------------------------------------------------


def _keyword_arguments(forward_params: list[str], args: tuple, kwargs: dict) -> dict:
    if len(args) > len(forward_params):
        raise DiffparError("cfg parallel: the denoiser was called with more positional arguments than it names.")
    out = dict(zip(forward_params, args))
    out.update(kwargs)
    return out


def _positional_names(model) -> list[str]:
    params = list(inspect.signature(type(model).forward).parameters.values())[1:]  # drop self
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


# -- batched ------------------------------------------------------------------------------------------------------


class BatchSplitter:
    """Splits the batch of one denoiser's forward over `group` and gathers the outputs (see module doc)."""

    def __init__(self, name, model, batch_args, group, timeout_s, runtime: CfgRuntime, dim: str):
        self.name, self.batch_args, self.group, self.timeout_s = name, batch_args, group, timeout_s
        self.runtime, self.dim = runtime, dim
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.params = _positional_names(model)
        self.counters = runtime.counters.setdefault(name, DenoiserCounters())

    def batch_size(self, kwargs: dict) -> int | None:
        for key in self.batch_args.tensors:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 1:
                return value.shape[0]
        return None

    def __call__(self, wrapped, instance, args, kwargs):
        self.counters.calls += 1
        kwargs = _keyword_arguments(self.params, args, kwargs)
        batch = self.batch_size(kwargs)
        if batch is None or batch < self.size:
            self.runtime.note_once(
                f"{self.name}: a batch of {batch} cannot split over the {self.size} {self.dim} groups, so every group "
                f"computes it whole (redundant ranks). A prompt batch or num_images_per_prompt of at least "
                f"{self.size}{', or guidance (cfg_size=2 splits its branches)' if self.dim == 'dp' else ''} would use "
                "them."
            )
            self.counters.computed += 1
            self.counters.batches.append(batch)
            return wrapped(**kwargs)
        sizes = even_split(batch, self.size)
        start = sum(sizes[: self.rank])
        stop = start + sizes[self.rank]
        local = dict(kwargs)
        for key in self.batch_args.tensors:
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                local[key] = value[start:stop]
        for key in self.batch_args.lists:
            value = kwargs.get(key)
            if isinstance(value, (list, tuple)) and len(value) == batch:
                local[key] = value[start:stop]
        self.counters.computed += 1
        self.counters.batches.append(stop - start)
        output = wrapped(**local)
        largest = sizes[0]

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dim() == 0 or tensor.shape[0] != stop - start:
                return tensor  # not per-sample (the same on every group)
            padded = tensor
            if tensor.shape[0] < largest:  # gloo's all-gather wants equal sizes: pad, then trim
                pad = tensor.new_zeros((largest - tensor.shape[0], *tensor.shape[1:]))
                padded = torch.cat([tensor, pad])
            parts = _all_gather(padded, self.group, self.timeout_s, self.counters,
                                f"diffpar {self.dim} batch gather ({self.name})")
            return torch.cat([p[:n] for p, n in zip(parts, sizes)])

        return _map_tensors(output, gather)


# -- two calls ------------------------------------------------------------------------------------------------------


class TwoCallsSplitter:
    """Group 0 computes the cond call, group 1 the uncond call, one exchange per step (see module doc)."""

    TEMPLATES_KEPT = 8  # output templates remembered per denoiser (one per distinct input shapes)

    def __init__(self, name, model, group, timeout_s, runtime: CfgRuntime):
        self.name, self.group, self.timeout_s, self.runtime = name, group, timeout_s, runtime
        self.rank = dist.get_rank(group)
        self.counters = runtime.counters.setdefault(name, DenoiserCounters())
        self.branches: list[str | None] = []  # the cache_context names entered, innermost last
        # input key -> OutputTemplate, learned from first-step cond calls, which every rank computes: every rank
        # holds the same entries, so every rank decides alike whether a call splits from its first step.
        self.templates: dict = {}
        self.reset()

    def reset(self, guided: bool | None = None) -> None:
        """A new pipeline call: learn again (sizes and guidance may change between calls). `guided`: what the
        pipeline says of this call's guidance before its first denoiser call (None: it does not say)."""
        self.mode = "learning"  # -> "cfg" after the first uncond call, "plain" when a cond follows a cond
        self.guided = guided
        self.template = None  # this call's cond output template (group 1 builds its placeholders from it)
        self.pending = None  # group 0: its cond result; group 1: the placeholder it handed out
        self.awaiting_uncond = False

    @contextlib.contextmanager
    def branch(self, name):
        self.branches.append(name)
        try:
            yield
        finally:
            self.branches.pop()

    def cache_context_wrapper(self, wrapped, instance, args, kwargs):
        name = args[0] if args else kwargs.get("name")
        inner = wrapped(*args, **kwargs)

        @contextlib.contextmanager
        def both():
            with inner, self.branch(name):
                yield

        return both()

    def _error(self, what: str) -> CfgPatternError:
        self.reset()
        return CfgPatternError(
            f"cfg parallel ({self.name}): {what}. The pipeline's denoiser calls no longer follow the pattern learned "
            "in the first step of this call (one cache_context('cond') call, then one cache_context('uncond') call "
            "per step), so the guidance branches cannot be split; nothing was blended. Run this pipeline with "
            "cfg_size=1."
        )

    def __call__(self, wrapped, instance, args, kwargs):
        self.counters.calls += 1
        branch = self.branches[-1] if self.branches else None
        if branch == "cond":
            return self._cond(wrapped, args, kwargs)
        if branch == "uncond":
            return self._uncond(wrapped, args, kwargs)
        self.counters.computed += 1  # outside the guidance pattern: whole, on every rank
        return wrapped(*args, **kwargs)

    def _compute(self, wrapped, args, kwargs):
        self.counters.computed += 1
        output = wrapped(*args, **kwargs)
        tensors = _tensors(output)
        if len(tensors) != 1:
            raise self._error(f"its output holds {len(tensors)} tensors, where one prediction was expected")
        return output, tensors[0]

    def _cond(self, wrapped, args, kwargs):
        if self.awaiting_uncond:
            if self.mode == "cfg":
                raise self._error("two cond calls in a row, where a cond call was always followed by an uncond one "
                                  "(or the pipeline said guidance was on for this call)")
            self.mode = "plain"
            self.runtime.note_once(
                f"{self.name}: this pipeline call has no unconditional branch (guidance off): every rank computes "
                "every step, as without cfg_size."
            )
        key = None
        if self.mode == "learning":  # the first cond call of this pipeline call
            key = _input_key((args, kwargs))
            known = self.templates.get(key)
            if known is not None and self.guided is True:  # split from this first step
                self.mode, self.template = "cfg", known
                self.counters.split_from_first_step += 1
        if self.mode != "cfg" or self.rank == 0:
            output, tensor = self._compute(wrapped, args, kwargs)
            if self.mode != "cfg":
                self.template = OutputTemplate.of(output, tensor)
                if key is not None:
                    self.templates.pop(key, None)
                    self.templates[key] = self.template
                    while len(self.templates) > self.TEMPLATES_KEPT:
                        self.templates.pop(next(iter(self.templates)))
            self.pending = tensor
            self.awaiting_uncond = True
            return output
        placeholder = self.template.placeholder()
        self.counters.placeholders += 1
        self.pending = placeholder
        self.awaiting_uncond = True
        return self.template.fill(placeholder)

    def _uncond(self, wrapped, args, kwargs):
        if not self.awaiting_uncond:
            raise self._error("an uncond call with no cond call before it in this step")
        if self.mode == "plain":  # guidance switched on within the call: the cond just computed everywhere
            self.mode = "learning"
        output = None
        if self.rank == 1:
            output, mine = self._compute(wrapped, args, kwargs)
            if mine.shape != self.pending.shape or mine.dtype != self.pending.dtype:
                raise self._error(f"the uncond prediction {tuple(mine.shape)} {mine.dtype} differs in shape from "
                                  f"the cond one {tuple(self.pending.shape)} {self.pending.dtype}")
        else:
            mine = self.pending
        cond, uncond = _all_gather(mine, self.group, self.timeout_s, self.counters,
                                   f"diffpar cfg exchange ({self.name})")
        if self.rank == 1 and self.mode == "cfg":
            self.pending.copy_(cond)  # the pipeline still holds this tensor: it becomes the cond prediction
        self.mode = "cfg"
        self.pending = None
        self.awaiting_uncond = False
        if output is not None:
            return output
        return self.template.fill(uncond)


# -- apply -----------------------------------------------------------------------------------------------------------


def apply_cfg_parallel(payload: CfgPayload, group, handle, timeout_s: float) -> CfgRuntime:
    """Wrap each denoiser's forward (and, for two calls, its `cache_context` and the pipeline's `prepare_latents`,
    where each pipeline call starts). Undo recorded first; no collective."""
    runtime = CfgRuntime(mode=payload.mode, group_size=dist.get_world_size(group), group_rank=dist.get_rank(group))
    patches: list[Patch] = []

    def undo():
        while patches:
            patches.pop().undo()

    handle.add(f"{payload.mode} split over the {payload.dim} groups", undo)
    splitters = []
    for name, model, batch_args in payload.denoisers:
        if payload.mode == BATCHED:
            splitter = BatchSplitter(name, model, batch_args, group, timeout_s, runtime, payload.dim)
        else:
            splitter = TwoCallsSplitter(name, model, group, timeout_s, runtime)
            patches.append(Patch(model, "cache_context", splitter.cache_context_wrapper,
                                 label=f"{name}.cache_context"))
            splitters.append(splitter)
        patches.append(Patch(model, "forward", splitter, label=f"{name}.forward"))
    if splitters and payload.pipeline is not None:
        def new_call(wrapped, instance, args, kwargs):
            guided = None
            if payload.guided is not None:
                try:
                    guided = payload.guided(payload.pipeline)
                except Exception:  # a hint only: without it the call learns in its first step
                    guided = None
            for s in splitters:
                s.reset(guided if isinstance(guided, bool) else None)
            return wrapped(*args, **kwargs)

        patches.append(Patch(payload.pipeline, "prepare_latents", new_call,
                             label=f"{type(payload.pipeline).__name__}.prepare_latents"))
    return runtime
