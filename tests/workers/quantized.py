"""Rank-side runs of a torchao weight-only int8 model under diffpar (tests/test_quantized.py)."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_transformers
from diffpar.testing.probes import SplitProbe


def _quantized(model_name: str):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model, make_inputs = tiny_transformers.build(model_name, heads=4)
    quantize_(model, Int8WeightOnlyConfig())
    return model, make_inputs


def quantized_cp_equivalence(model_name: str, config: dict):
    """The same int8 model in one process vs context parallel: the weights are not touched by CP."""
    model, make_inputs = _quantized(model_name)
    inputs = make_inputs(seq=16, text=8)
    reference_model = copy.deepcopy(model)
    with torch.no_grad(), SplitProbe(reference_model) as reference_probe:
        reference = reference_model(**copy.deepcopy(inputs))[0]
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    try:
        with torch.no_grad(), SplitProbe(model) as probe:
            out = model(**copy.deepcopy(inputs))[0]
        quantized = sorted({type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
    finally:
        handle.detach()
    return {"rank": dist.get_rank(), "diff": (out - reference).abs().max().item(), "split": probe.summary(),
            "split_reference": reference_probe.summary(), "weight_types": quantized}


def quantized_tp_error(model_name: str, config: dict):
    model, _ = _quantized(model_name)
    try:
        diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    except diffpar.DiffparError as exc:
        return f"{type(exc).__name__}: {exc}"
    diffpar.disable_cache(model)
    return None
