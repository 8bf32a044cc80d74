"""Whether a module runs compiled (torch.compile): its Python hooks and the functions they call were traced, so
code that must run eagerly at a module's first forward (the call agreement's settle point) cannot count on them."""
from __future__ import annotations

import torch


def any_compiled(attributes: dict, names: tuple) -> bool:
    """Whether any of `attributes[name]` (an object's attributes: a pipeline's modules) runs compiled.
    `torch.compile(module)` returns a wrapper (dynamo's OptimizedModule, found by name: its module path is private);
    `module.compile()` compiles in place and records it on the module. One plain loop: it runs at the start of
    every pipeline call."""
    for name in names:
        module = attributes.get(name)
        if isinstance(module, torch.nn.Module) and (
                type(module).__name__ == "OptimizedModule" or module._compiled_call_impl is not None):
            return True
    return False
