"""Cache skip decisions that every rank of one model copy takes together, and diffpar's own DBCache hooks.

Under context parallelism each rank holds a shard of the sequence, so a cache that measures "how much did the
first blocks' output change" on its own shard can decide to skip on one rank and to compute on another. The
computing rank then enters the attention all-to-all that the skipping rank never joins: a hang. `DecisionSync`
reduces the measurement itself across the ranks that share the model (one all-reduce of two numbers per step),
so every rank sees the measure the one-process model would see and takes the same decision.

The DBCache hooks ("dual block" cache) are diffusers `ModelHook`s on the transformer blocks, named so they can be
removed one by one: the first Fn blocks always run, the middle blocks are skipped (their cached residual is added
instead) when the first blocks' residual moved little since the last computed step, the last Bn blocks always run.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from diffpar.compat import diffusers_cache as compat

DBCACHE_FRONT_HOOK = "diffpar_dbcache_front"
DBCACHE_MIDDLE_HOOK = "diffpar_dbcache_middle"


# ---------------------------------------------------------------------------------------------------------------
# Agreement across the model group
# ---------------------------------------------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    if denominator > 0:
        return numerator / denominator
    return 0.0 if numerator == 0 else math.inf


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (diffusers' tensor-parallel plans can leave block outputs as DTensors): the
    sums over the model group then count each element once per replica, which leaves the ratio unchanged."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


class DecisionSync:
    """Reduces a cache's measurement over `group` (the ranks that hold shards of one model copy).

    `group=None` means one model copy per process: nothing to agree on, no collective.
    """

    def __init__(self, group=None):
        self.group = group
        self.collectives = 0  # how many all-reduces this sync issued (tests count them)

    @property
    def active(self) -> bool:
        return self.group is not None

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group) if self.group is not None else 1

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor,
                    force_compute: bool = False) -> tuple[float, float]:
        """sum|current - previous| / sum|previous| over the whole model group, and over this rank's shard.

        Ratios of sums equal the one-process ratio of means, whatever the shard sizes, and replicated
        activations (tensor parallelism) scale numerator and denominator alike. A shard whose shape changed since
        the previous step (or a caller's `force_compute`) votes through a third entry, so a change on one rank only
        (uneven shards) makes every rank compute instead of one rank leaving the collective.
        """
        current, previous = _local(current), _local(previous)
        dtype = torch.float64 if current.device.type in ("cpu", "cuda") else torch.float32
        if current.shape == previous.shape and not force_compute:
            local = torch.stack(
                [
                    (current - previous).abs().sum(dtype=dtype),
                    previous.abs().sum(dtype=dtype),
                    torch.zeros((), dtype=dtype, device=current.device),
                ]
            )
        else:
            local = torch.tensor([0.0, 0.0, 1.0], dtype=dtype, device=current.device)
        local_values = local.tolist()
        local_ratio = math.inf if local_values[2] else _ratio(local_values[0], local_values[1])
        if self.group is None:
            return local_ratio, local_ratio
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        self.collectives += 1
        values = total.tolist()
        return (math.inf if values[2] else _ratio(values[0], values[1])), local_ratio

    def any(self, flag: bool, device=None) -> bool:
        """True on every rank when it is True on any rank (used as "compute if any rank wants to")."""
        if self.group is None:
            return bool(flag)
        vote = torch.tensor([int(bool(flag))], dtype=torch.int32, device=device or "cpu")
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.group)
        self.collectives += 1
        return bool(vote.item())


# ---------------------------------------------------------------------------------------------------------------
# What the caches decided: counts and the skip pattern, per model and cache context
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Decision:
    model: str
    context: str
    step: int  # forward index within this context since the cache state was last reset
    computed: bool
    reason: str  # "warmup", "first step", "diff above threshold", "diff within threshold", caps, ...
    diff: float | None = None  # the measure the decision used (reduced over the model group)
    local_diff: float | None = None  # the same measure on this rank's shard only (what an unsynced rank would use)


@dataclass
class CacheStats:
    """Every skip decision diffpar's cache hooks took, in order. Reset with `reset()` (not by pipeline calls)."""

    decisions: list[Decision] = field(default_factory=list)
    tracked: bool = True  # False for diffusers caches whose decision diffpar does not observe
    _steps: "weakref.WeakKeyDictionary" = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    def next_step(self, state) -> int:
        """A step index per diffusers state object: a fresh state (new context or after a reset) starts at 0."""
        step = self._steps.get(state, -1) + 1
        self._steps[state] = step
        return step

    def record(self, decision: Decision) -> None:
        self.decisions.append(decision)

    def record_decision(self, model: str, context: str, step: int, computed: bool, reason: str,
                        diff: float | None = None, local_diff: float | None = None) -> None:
        self.decisions.append(Decision(model, context, step, computed, reason, diff, local_diff))

    @property
    def computed(self) -> int:
        return sum(d.computed for d in self.decisions)

    @property
    def skipped(self) -> int:
        return sum(not d.computed for d in self.decisions)

    def pattern(self, context: str | None = None, model: str | None = None) -> list[bool]:
        """True for a computed step, False for a skipped one."""
        return [
            d.computed
            for d in self.decisions
            if (context is None or d.context == context) and (model is None or d.model == model)
        ]

    def reset(self) -> None:
        self.decisions.clear()

    def summary(self) -> dict:
        return {"computed": self.computed, "skipped": self.skipped, "tracked": self.tracked}


# ---------------------------------------------------------------------------------------------------------------
# DBCache hooks
# ---------------------------------------------------------------------------------------------------------------


def split_block_output(metadata, output):
    """(hidden_states, encoder_hidden_states or None) of a block's output, per diffusers' block metadata."""
    if isinstance(output, tuple):
        hidden = output[metadata.return_hidden_states_index]
        encoder = None
        if metadata.return_encoder_hidden_states_index is not None:
            encoder = output[metadata.return_encoder_hidden_states_index]
        return hidden, encoder
    return output, None


def join_block_output(metadata, hidden, encoder, like=None):
    """A block output holding `hidden` and `encoder` at the metadata's indices; other items are taken from `like`
    (the block's real output) when there is one."""
    if metadata.return_encoder_hidden_states_index is None and not isinstance(like, tuple):
        return hidden
    if isinstance(like, tuple):
        out = list(like)
    else:
        out = [None] * (1 + max(metadata.return_hidden_states_index, metadata.return_encoder_hidden_states_index))
    out[metadata.return_hidden_states_index] = hidden
    if metadata.return_encoder_hidden_states_index is not None:
        out[metadata.return_encoder_hidden_states_index] = encoder
    return tuple(out)


class DBCacheState(compat.base_state_class()):
    """Per cache context ("cond", "uncond", ...) state of one model's DBCache."""

    def __init__(self):
        self.reset()

    def reset(self, *args, **kwargs):
        self.step = -1
        self.entry_hidden = None  # input hidden_states of block 0
        self.previous_indicator = None  # first-blocks residual at the last computed step
        self.middle_input = None  # (hidden, encoder) entering the skippable blocks at a computed step
        self.middle_residual = None  # (hidden, encoder) those blocks added at the last computed step
        self.should_compute = True
        self.consecutive_cached = 0
        self.cached_total = 0


class _DBCacheHookBase(compat.model_hook_class()):
    _is_stateful = True

    def __init__(self, state_manager, metadata):
        super().__init__()
        self.state_manager = state_manager
        self.metadata = metadata

    def reset_state(self, module):
        self.state_manager.reset()
        return module

    def _state(self):
        compat.ensure_context(self.state_manager)
        return self.state_manager.get_state()


class DBCacheFrontHook(_DBCacheHookBase):
    """On block 0 (`is_entry`: counts the step, keeps the input) and on block Fn-1 (`is_decision`: decides)."""

    def __init__(self, state_manager, metadata, config, sync: DecisionSync, stats: CacheStats, model_name: str,
                 is_entry: bool, is_decision: bool):
        super().__init__(state_manager, metadata)
        self.config = config
        self.sync = sync
        self.stats = stats
        self.model_name = model_name
        self.is_entry = is_entry
        self.is_decision = is_decision

    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        state = self._state()
        if self.is_entry:
            state.step += 1
            state.entry_hidden = compat.block_argument(self.metadata, "hidden_states", args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not self.is_decision:
            return output
        hidden, encoder = split_block_output(self.metadata, output)
        indicator = hidden - state.entry_hidden
        computed, reason, diff, local_diff = self._decide(state, indicator, encoder)
        state.should_compute = computed
        self.stats.record(
            Decision(self.model_name, compat.context_name(self.state_manager), state.step, computed, reason, diff,
                     local_diff)
        )
        state.entry_hidden = None
        if computed:
            state.previous_indicator = indicator.detach()
            state.middle_input = (hidden.detach(), None if encoder is None else encoder.detach())
            state.consecutive_cached = 0
            return output
        state.consecutive_cached += 1
        state.cached_total += 1
        cached_hidden, cached_encoder = state.middle_residual
        hidden = hidden + cached_hidden
        if encoder is not None and cached_encoder is not None:
            encoder = encoder + cached_encoder
        return join_block_output(self.metadata, hidden, encoder, output)

    def _decide(self, state, indicator, encoder):
        """(computed, reason, diff, local_diff). Every branch before the measure depends only on counters that
        advance identically on every rank, so all ranks reach the all-reduce together or none does."""
        cfg = self.config
        if state.step < cfg.max_warmup_steps:
            return True, "warmup", None, None
        if state.previous_indicator is None or state.middle_residual is None:
            return True, "first step", None, None
        if cfg.max_continuous_cached_steps is not None and state.consecutive_cached >= cfg.max_continuous_cached_steps:
            return True, "max_continuous_cached_steps", None, None
        if cfg.max_cached_steps is not None and state.cached_total >= cfg.max_cached_steps:
            return True, "max_cached_steps", None, None
        # A cached residual that no longer fits this step's text stream cannot be added: compute (voted, see sync).
        cached_encoder = state.middle_residual[1]
        encoder_mismatch = encoder is not None and cached_encoder is not None and encoder.shape != cached_encoder.shape
        diff, local_diff = self.sync.relative_l1(indicator, state.previous_indicator, force_compute=encoder_mismatch)
        if diff <= cfg.residual_diff_threshold:
            return False, "diff within threshold", diff, local_diff
        return True, "diff above threshold", diff, local_diff


class DBCacheMiddleHook(_DBCacheHookBase):
    """On each skippable block: runs it on computed steps, passes its input through on skipped ones. The last one
    (`is_last`) records what the skippable blocks added, for the next skipped step."""

    def __init__(self, state_manager, metadata, is_last: bool):
        super().__init__(state_manager, metadata)
        self.is_last = is_last

    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        state = self._state()
        if state.should_compute:
            output = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_last and state.middle_input is not None:
                hidden, encoder = split_block_output(self.metadata, output)
                in_hidden, in_encoder = state.middle_input
                encoder_residual = None
                if encoder is not None and in_encoder is not None and encoder.shape == in_encoder.shape:
                    encoder_residual = (encoder - in_encoder).detach()
                state.middle_residual = ((hidden - in_hidden).detach(), encoder_residual)
                state.middle_input = None
            return output
        hidden = compat.block_argument(self.metadata, "hidden_states", args, kwargs)
        encoder = None
        if self.metadata.return_encoder_hidden_states_index is not None:
            encoder = compat.block_argument(self.metadata, "encoder_hidden_states", args, kwargs)
        return join_block_output(self.metadata, hidden, encoder)


@dataclass
class DBCachePlan:
    """Which blocks get which hook: block 0 enters, block Fn-1 decides, Fn..N-Bn-1 may be skipped."""

    blocks: list  # (name, module, metadata) for blocks 0 .. N-Bn-1
    decision_index: int
    n_blocks: int


def plan_dbcache(model: torch.nn.Module, config, model_name: str) -> DBCachePlan:
    """Local checks, no collectives: which blocks exist, whether the counts leave something to skip."""
    from diffpar.errors import DiffparError, UnsupportedError

    blocks = compat.transformer_blocks(model)
    n = len(blocks)
    if n == 0:
        raise UnsupportedError(
            f"DBCacheConfig: {model_name} ({type(model).__name__}) has no transformer block lists "
            f"({', '.join(compat.block_list_names())}), so there is nothing for the cache to skip."
        )
    fn, bn = config.Fn_compute_blocks, config.Bn_compute_blocks
    if fn + bn >= n:
        raise DiffparError(
            f"DBCacheConfig: Fn_compute_blocks={fn} + Bn_compute_blocks={bn} leaves no block to skip in "
            f"{model_name}, which has {n} transformer blocks. Choose Fn_compute_blocks + Bn_compute_blocks < {n}."
        )
    hooked = []
    for name, block in blocks[: n - bn]:
        metadata = compat.block_metadata(block)
        if metadata is None:
            raise UnsupportedError(
                f"DBCacheConfig: diffusers does not register the block class {type(block).__name__} ({model_name}."
                f"{name}), so diffpar cannot tell which of its outputs are the hidden states. Use a diffusers cache "
                "that does not need block metadata (TaylorSeerCacheConfig) or a model whose blocks diffusers knows."
            )
        hooked.append((name, block, metadata))
    streams = {md.return_encoder_hidden_states_index is None for _, _, md in hooked[fn - 1:]}
    if len(streams) > 1:
        raise UnsupportedError(
            f"DBCacheConfig: in {model_name}, the blocks from {hooked[fn - 1][0]} to {hooked[-1][0]} mix blocks that "
            "return the text stream with blocks that do not, so the skipped blocks' residual cannot be carried over. "
            "Move Fn_compute_blocks so the skipped range holds one kind of block."
        )
    return DBCachePlan(blocks=hooked, decision_index=fn - 1, n_blocks=n)


def apply_dbcache(model: torch.nn.Module, plan: DBCachePlan, config, sync: DecisionSync, stats: CacheStats,
                  model_name: str, handle) -> None:
    """Register the hooks, the undo that removes them (and leaves the blocks as they were) recorded first."""
    state_manager = compat.new_state_manager(DBCacheState)
    registered = []  # (block, hook name, the block's hook state before)
    last_middle = len(plan.blocks) - 1

    def register(block, hook, hook_name):
        registered.append((block, hook_name, compat.hook_state(block)))
        compat.register_hook(block, hook, hook_name)

    handle.add(f"{model_name}: diffpar DBCache hooks", lambda: _remove(registered, model))
    for index, (name, block, metadata) in enumerate(plan.blocks):
        if index <= plan.decision_index:
            is_entry, is_decision = index == 0, index == plan.decision_index
            if is_entry or is_decision:
                hook = DBCacheFrontHook(state_manager, metadata, config, sync, stats, model_name,
                                        is_entry=is_entry, is_decision=is_decision)
                register(block, hook, DBCACHE_FRONT_HOOK)
        else:
            register(block, DBCacheMiddleHook(state_manager, metadata, is_last=index == last_middle),
                     DBCACHE_MIDDLE_HOOK)
    compat.invalidate_child_registries(model)


def _remove(registered, model) -> None:
    for block, hook_name, before in reversed(registered):
        compat.remove_hook_exactly(block, hook_name, before)
    registered.clear()
    compat.invalidate_child_registries(model)
