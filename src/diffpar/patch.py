"""One wrapt patch and the handle that undoes it.

We keep the wrapper `wrapt.wrap_function_wrapper` returns and restore exactly what was there before: the
original attribute for modules and classes, or no instance attribute at all when the patch shadowed a
class method on one instance.
"""
from __future__ import annotations

import wrapt

_MISSING = object()


class Patch:
    def __init__(self, target, name: str, wrapper, *, label: str | None = None):
        self.target = target
        self.name = name
        self.label = label or f"{type(target).__name__}.{name}"
        # What the target itself held (not what it inherits): restored on undo.
        self._own_before = vars(target).get(name, _MISSING) if hasattr(target, "__dict__") else _MISSING
        self.wrapper = wrapt.wrap_function_wrapper(target, name, wrapper)
        self.active = True

    def undo(self) -> None:
        if not self.active:
            return
        current = vars(self.target).get(self.name, _MISSING)
        if current is not self.wrapper:
            raise RuntimeError(
                f"cannot undo diffpar's patch of {self.label}: something else replaced it after diffpar "
                "(another wrapper stacked on top). Undo that wrapper first, then detach diffpar."
            )
        if self._own_before is _MISSING:
            delattr(self.target, self.name)
        else:
            setattr(self.target, self.name, self._own_before)
        self.active = False
