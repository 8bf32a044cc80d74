"""One patch of an attribute (a wrapt-style wrapper) and the handle that undoes it.

`wrapper(wrapped, instance, args, kwargs)` has wrapt's calling convention. What is installed is a plain Python
function (a staticmethod / classmethod where the original was one), never a wrapt proxy: torch.compile reads a
wrapt `FunctionWrapper` as the function it proxies (it passes `isinstance(..., FunctionType)` and its `__code__`
is the original's), so under compile every wrapt patch was silently skipped (measured: torch 2.13, module
functions and class methods alike). A plain function is traced like any other code.

We keep what was installed and restore exactly what was there before: the original attribute for modules and
classes, or no instance attribute at all when the patch shadowed a class method on one instance.
"""
from __future__ import annotations

import functools
import inspect

_MISSING = object()


class Patch:
    def __init__(self, target, name: str, wrapper, *, label: str | None = None):
        self.target = target
        self.name = name
        self.label = label or f"{type(target).__name__}.{name}"
        # What the target itself held (not what it inherits): restored on undo.
        self._own_before = vars(target).get(name, _MISSING) if hasattr(target, "__dict__") else _MISSING
        self.wrapper = _install(target, name, wrapper)
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


def is_diffpar_patch(obj) -> bool:
    """Whether `obj` (an attribute's raw value) is a wrapper a `Patch` installed."""
    fn = getattr(obj, "__func__", obj)  # staticmethod / classmethod objects hold the function
    return getattr(fn, "_diffpar_patch", False)


def _wrapping(original, patched):
    functools.update_wrapper(patched, original)  # name, docstring, signature (through __wrapped__)
    patched._diffpar_patch = True
    return patched


def _install(target, name: str, wrapper):
    """Set `target.name` to a plain function calling `wrapper(wrapped, instance, args, kwargs)` as wrapt would;
    returns the object set."""
    static = None
    if isinstance(target, type):
        for klass in target.__mro__:  # the raw attribute, wherever it is defined
            if name in vars(klass):
                static = vars(klass)[name]
                break
    if isinstance(target, type) and (isinstance(static, (staticmethod, classmethod)) or inspect.isfunction(static)):
        if isinstance(static, staticmethod):
            fn = static.__func__

            def patched_static(*args, **kwargs):
                return wrapper(fn, None, args, kwargs)

            installed = staticmethod(_wrapping(fn, patched_static))
        elif isinstance(static, classmethod):
            fn = static.__func__

            def patched_class(cls, *args, **kwargs):
                return wrapper(fn.__get__(cls, cls), cls, args, kwargs)

            installed = classmethod(_wrapping(fn, patched_class))
        elif inspect.isfunction(static):
            fn = static

            def patched_method(self, *args, **kwargs):
                return wrapper(fn.__get__(self, type(self)), self, args, kwargs)

            installed = _wrapping(fn, patched_method)
    else:
        # A module's function, one object's (bound) method, or a class attribute that is no Python function (e.g.
        # a class without `__call__` of its own, resolved through its metaclass): wrapped as found, the object it
        # is bound to as the instance, as wrapt has it.
        original = getattr(target, name)
        instance = original.__self__ if inspect.ismethod(original) else None

        def patched(*args, **kwargs):
            return wrapper(original, instance, args, kwargs)

        installed = _wrapping(original, patched)
    setattr(target, name, installed)
    return installed
