"""Rank-side checks for transformer context parallelism."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_transformers


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def cp_equivalence(model_name: str, config: dict, seq: int = 16, text: int = 8, batch: int = 1,
                   model_kwargs: dict | None = None, input_kwargs: dict | None = None, detach_check: bool = True):
    """One process vs context parallel on this world: returns max abs diff and detach diff on each rank."""
    model, make_inputs = tiny_transformers.build(model_name, **(model_kwargs or {}))
    inputs = make_inputs(seq=seq, text=text, batch=batch, **(input_kwargs or {}))
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        reference = _first(reference_model(**copy.deepcopy(inputs)))
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    with torch.no_grad():
        parallel = _first(model(**copy.deepcopy(inputs)))
    result = {
        "diff": (parallel - reference).abs().max().item(),
        "shape": tuple(parallel.shape),
        "steps": handle.step_names,
        "rank": dist.get_rank(),
    }
    if detach_check:
        handle.detach()
        with torch.no_grad():
            after = _first(model(**copy.deepcopy(inputs)))
        result["detach_diff"] = (after - reference).abs().max().item()
    return result
