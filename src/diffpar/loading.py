"""`diffpar.empty_pipeline`: a pipeline from a saved local directory whose largest modules are built without
their weights, for `ParallelismConfig(weights_from="auto")` to read each rank's shards into (docs/loading.md).

`DiffusionPipeline.from_pretrained(directory)` (and each model's `from_pretrained`, `low_cpu_mem_usage=True` or
not) reads every weight whole, which is what sharded loading avoids. Here the modules named in `empty` are built
from their saved configs under accelerate's `init_empty_weights()` (parameters on meta, buffers real), tagged
with their subfolder, and handed to the pipeline's own `from_pretrained`, which loads everything else (VAE,
tokenizers, scheduler, any module not named) normally. No weight of an empty module is read.
"""
from __future__ import annotations

import json
import os

import torch

from diffpar.compat.empty_modules import build_empty, component_class
from diffpar.components import DENOISER_ATTRS
from diffpar.engines.sharded_loading import SOURCE_ATTR
from diffpar.errors import DiffparError


def empty_pipeline(directory, empty=None, *, pipeline_class=None, torch_dtype: torch.dtype | None = None,
                   **from_pretrained_kwargs):
    """The pipeline saved in local `directory` (a `save_pretrained` output or a downloaded snapshot), with the
    modules named in `empty` on the meta device; the rest loaded as `from_pretrained` loads them.

    empty: component names (default: the denoisers, e.g. ["transformer"]). A text encoder named here must also
        be in `extra_parallel_modules` (its shards are read by rank); anything else diffpar cannot load by shards.
    pipeline_class: default `diffusers.DiffusionPipeline` (the class model_index.json names).
    torch_dtype: the dtype of every module, as for from_pretrained (the empty modules are built in it; the files
        are cast to it when read).
    Then: `diffpar.enable_cache(pipe, parallelism_config=ParallelismConfig(tp_size=..., weights_from="auto"))`.
    """
    directory = os.fspath(directory)
    index_path = os.path.join(directory, "model_index.json")
    if not os.path.isfile(index_path):
        raise DiffparError(f"empty_pipeline: {directory} has no model_index.json (a local pipeline directory, as "
                           "save_pretrained writes it, is needed; the Hugging Face Hub is not read).")
    with open(index_path) as f:
        index = {name: entry for name, entry in json.load(f).items()
                 if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[0]}
    if empty is None:
        empty = [name for name in DENOISER_ATTRS if name in index]
    elif isinstance(empty, str):
        empty = [empty]
    missing = [name for name in empty if name not in index]
    if missing:
        raise DiffparError(f"empty_pipeline: {directory} has no component {missing[0]!r}; its components: "
                           f"{sorted(index)}.")
    built = {}
    for name in empty:
        library, class_name = index[name]
        subfolder = os.path.join(directory, name)
        try:
            module = build_empty(component_class(library, class_name), subfolder, torch_dtype)
        except TypeError as exc:
            raise DiffparError(f"empty_pipeline: {name!r}: {exc}; only model weights can be read by shards.") from exc
        setattr(module, SOURCE_ATTR, subfolder)
        built[name] = module
    if pipeline_class is None:
        from diffusers import DiffusionPipeline

        pipeline_class = DiffusionPipeline
    if torch_dtype is not None:
        from_pretrained_kwargs["torch_dtype"] = torch_dtype
    return pipeline_class.from_pretrained(directory, **built, **from_pretrained_kwargs)
