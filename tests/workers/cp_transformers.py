"""Rank-side checks for transformer context parallelism."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_transformers
from diffpar.testing.probes import SplitProbe


def _first(out):
    first = out[0] if isinstance(out, (tuple, list)) else out.sample
    # Per-item outputs (Cosmos 3 returns one tensor per packed item in a list): the single item.
    return first[0] if isinstance(first, list) and len(first) == 1 else first


def cp_equivalence(model_name: str, config: dict, seq: int = 16, text: int = 8, batch: int = 1,
                   model_kwargs: dict | None = None, input_kwargs: dict | None = None, detach_check: bool = True,
                   enable: bool = True, return_dict: bool = False):
    """One process vs context parallel on this world: returns max abs diff and detach diff on each rank, and what
    the first attention saw and which collectives ran in each run ("split", "split_reference").

    `enable=False` skips enable_cache: the no-op the split checks must catch. `return_dict=True`: call the model the
    default way (a diffusers output object), its class name in "output_type".
    """
    model, make_inputs = tiny_transformers.build(model_name, **(model_kwargs or {}))
    inputs = make_inputs(seq=seq, text=text, batch=batch, **(input_kwargs or {}))
    output_types = []
    if return_dict:
        inputs["return_dict"] = True
    reference_model = copy.deepcopy(model)
    with torch.no_grad(), SplitProbe(reference_model) as reference_probe:
        reference = _first(reference_model(**copy.deepcopy(inputs)))
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config)) if enable else None
    try:
        with torch.no_grad(), SplitProbe(model) as probe:
            out = model(**copy.deepcopy(inputs))
            output_types.append(type(out).__name__)
            parallel = _first(out)
        diff = (parallel - reference).abs().max().item()  # inside: a failed comparison must detach too
    except BaseException:
        if handle is not None:  # a refused call (e.g. a mask under Ring) must not leave the model parallel
            handle.detach()
        raise
    if handle is None:
        return {"rank": dist.get_rank(), "diff": diff, "split": probe.summary(),
                "split_reference": reference_probe.summary()}
    result = {
        "split": probe.summary(),
        "split_reference": reference_probe.summary(),
        "diff": diff,
        "shape": tuple(parallel.shape),
        "steps": handle.step_names,
        "rank": dist.get_rank(),
        "output_type": output_types[0],
    }
    if detach_check:
        handle.detach()
        with torch.no_grad():
            after = _first(model(**copy.deepcopy(inputs)))
        result["detach_diff"] = (after - reference).abs().max().item()
    return result
