"""The handle `enable_cache` returns: an ordered stack of named undo steps, undone in reverse."""
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


@dataclass
class ParallelHandle:
    """What diffpar attached to a pipeline or model. `detach()` undoes it, last step first."""

    target: object
    config: object = None
    steps: list[UndoStep] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    detached: bool = False

    def add(self, name: str, undo: Callable[[], None], irreversible_reason: str | None = None) -> None:
        self.steps.append(UndoStep(name, undo, irreversible_reason))

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
        for step in reversed(self.steps):
            if step.irreversible_reason is not None:
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
