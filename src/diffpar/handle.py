"""The handle `enable_cache` returns: the applied plan, each engine's runtime state, and an ordered stack of named
undo steps, undone in reverse.

Every apply step records its undo *before* it changes anything (an undo must therefore tolerate a change that
was only partly made), so a failure halfway through leaves nothing behind once the handle is detached.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger("diffpar")


@dataclass
class UndoStep:
    name: str
    undo: Callable[[], None]
    # A step that cannot restore the original (a sharded encoder) says so instead of undoing.
    irreversible_reason: str | None = None
    # Whether that reason applies now (e.g. only once the full weights were released); None: always.
    irreversible: Callable[[], bool] | None = None

    @property
    def cannot_restore(self) -> bool:
        if self.irreversible_reason is None:
            return False
        return True if self.irreversible is None else bool(self.irreversible())


@dataclass
class ParallelHandle:
    """What diffpar attached to a pipeline or model. `detach()` undoes it, last step first."""

    target: object
    config: object = None
    plan: object = None  # the ParallelPlan that was applied (diffpar.plan_types)
    steps: list[UndoStep] = field(default_factory=list)
    # Runtime state an engine returned for a component ("vae": its split state, "cache": the cache's stats and
    # decision sync, "mesh": the device mesh), keyed by component name.
    states: dict = field(default_factory=dict)
    detached: bool = False

    def state(self, name: str):
        """The runtime state the engine of component `name` returned (e.g. the VAE's split state)."""
        if name not in self.states:
            raise KeyError(f"no runtime state for {name!r}; components with state: {sorted(self.states)}")
        return self.states[name]

    _on_commit: list = field(default_factory=list, repr=False)

    def add(self, name: str, undo: Callable[[], None], irreversible_reason: str | None = None,
            irreversible: Callable[[], bool] | None = None) -> None:
        """Record an undo step. Call it *before* making the change it undoes."""
        self.steps.append(UndoStep(name, undo, irreversible_reason, irreversible))

    def on_commit(self, fn: Callable[[], None]) -> None:
        """Run `fn` once every apply step on every rank succeeded (e.g. free weights a rollback would need)."""
        self._on_commit.append(fn)

    def commit(self) -> None:
        for fn in self._on_commit:
            fn()
        self._on_commit.clear()

    @property
    def step_names(self) -> list[str]:
        return [s.name for s in self.steps]

    def detach(self, *, strict: bool = True) -> list[str]:
        """Undo every step in reverse order.

        Returns the reasons of steps that could not restore the original (e.g. a tensor-parallel text encoder
        whose full weights were freed). With `strict=True` those raise after everything else was undone.
        """
        if self.detached:
            return []
        problems = []
        self._on_commit.clear()
        for step in reversed(self.steps):
            if step.cannot_restore:
                problems.append(f"{step.name}: {step.irreversible_reason}")
                step.undo()  # still removes hooks so the module stops issuing collectives
                continue
            step.undo()
        self.steps.clear()
        self.detached = True
        if getattr(self.target, "_diffpar_handle", None) is self:
            try:
                del self.target._diffpar_handle
            except AttributeError:
                pass
        if problems and strict:
            raise RuntimeError(
                "diffpar detached, but these modules cannot be restored to their original weights:\n  "
                + "\n  ".join(problems)
                + "\nReload them (e.g. `from_pretrained`) before using them in one process."
            )
        for p in problems:
            logger.warning("diffpar: %s", p)
        return problems
