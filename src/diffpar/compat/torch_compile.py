"""Whether a module runs compiled (torch.compile): its Python hooks and the functions they call were traced, so
code that must run eagerly at a module's first forward (the call agreement's settle point) cannot count on them."""
from __future__ import annotations

import torch


def is_compiled(module) -> bool:
    """`torch.compile(module)` returns a wrapper (dynamo's OptimizedModule, found by name: its module path is
    private); `module.compile()` compiles in place and records it on the module."""
    if not isinstance(module, torch.nn.Module):
        return False
    if type(module).__name__ == "OptimizedModule":
        return True
    return getattr(module, "_compiled_call_impl", None) is not None
