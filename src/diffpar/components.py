"""Which modules of a pipeline diffpar looks at: its denoisers and the extra modules the user listed.

Plain lookups on the user's objects, no torch.distributed, no model family: every layer above may use them.
"""
from __future__ import annotations

import torch

from diffpar.errors import DiffparError

# Pipeline attributes that hold the model that denoises, in the order pipelines use them.
# unconditional_transformer: Ideogram 4 runs its unconditional branch through a second transformer.
DENOISER_ATTRS = ("transformer", "transformer_2", "unconditional_transformer", "unet", "prior", "decoder")


def is_pipeline(obj) -> bool:
    return hasattr(obj, "components") and isinstance(getattr(obj, "components", None), dict)


def find_denoisers(target) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(target, torch.nn.Module):
        return [(type(target).__name__, target)]
    if not is_pipeline(target):
        raise DiffparError(
            f"enable_cache expects a diffusers pipeline or a torch.nn.Module, got {type(target).__name__}."
        )
    found = [(n, getattr(target, n)) for n in DENOISER_ATTRS if isinstance(getattr(target, n, None), torch.nn.Module)]
    if not found:
        raise DiffparError(
            f"{type(target).__name__} has none of {list(DENOISER_ATTRS)}: diffpar cannot find the model that "
            "denoises. Pass the model itself: enable_cache(pipe.<your model>, ...)."
        )
    return found


def resolve_extra_modules(target, entries) -> list[tuple[str, torch.nn.Module]]:
    """Map entries (modules or attribute names) to (attribute name, module) of the pipeline."""
    if not entries:
        return []
    if not is_pipeline(target):
        raise DiffparError(
            "extra_parallel_modules needs the pipeline: call enable_cache(pipe, ...) rather than on a bare model, "
            "so diffpar can check each entry belongs to it."
        )
    components = {n: m for n, m in target.components.items() if isinstance(m, torch.nn.Module)}
    by_id = {id(m): n for n, m in components.items()}
    resolved, seen = [], set()
    for entry in entries:
        if isinstance(entry, str):
            if entry not in components:
                raise DiffparError(
                    f"extra_parallel_modules: {type(target).__name__} has no module named {entry!r}. Its modules: "
                    f"{sorted(components)}."
                )
            name, module = entry, components[entry]
        else:
            if entry is None or id(entry) not in by_id:
                raise DiffparError(
                    f"extra_parallel_modules: a {type(entry).__name__} that is not a module of this "
                    f"{type(target).__name__} (modules: {sorted(components)}). Pass the pipeline's own attribute, "
                    "e.g. pipe.text_encoder, or its name 'text_encoder'."
                )
            name, module = by_id[id(entry)], entry
        if name in DENOISER_ATTRS:
            raise DiffparError(
                f"extra_parallel_modules: {name!r} is the denoiser, which ulysses_size/ring_size/tp_size already "
                "parallelize. Remove it from extra_parallel_modules."
            )
        if name in seen:
            raise DiffparError(f"extra_parallel_modules: {name!r} is listed twice.")
        seen.add(name)
        resolved.append((name, module))
    return resolved
