"""Rank-side check for Qwen-Image 2.1's prefix KV cache under context parallelism (the pipeline's default): a
first step that fills the cache and a second that reads it, against the same two steps in one process."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_transformers
from diffpar.testing.probes import SplitProbe


def _two_steps(model, inputs):
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    cache = QwenImage21KVCache(len(model.transformer_blocks))
    first = model(**copy.deepcopy(inputs), kv_cache=cache, kv_cache_mode="extract")[0]
    later = dict(copy.deepcopy(inputs), timestep=torch.full_like(inputs["timestep"], 0.25))
    second = model(**later, kv_cache=cache, kv_cache_mode="cached")[0]
    return first, second


def kv_cache_equivalence(config: dict, seq: int, text: int, text_padding: int = 0):
    model, make_inputs = tiny_transformers.build("qwenimage21", heads=4)
    inputs = make_inputs(seq=seq, text=text, text_padding=text_padding)
    reference_model = copy.deepcopy(model)
    with torch.no_grad(), SplitProbe(reference_model) as reference_probe:
        reference = _two_steps(reference_model, inputs)
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(**config))
    try:
        with torch.no_grad(), SplitProbe(model) as probe:
            parallel = _two_steps(model, inputs)
    finally:
        handle.detach()
    return {
        "rank": dist.get_rank(),
        "diffs": [(p - r).abs().max().item() for p, r in zip(parallel, reference)],
        "cached_tokens": reference[1].shape[1],
        "split": probe.summary(),
        "split_reference": reference_probe.summary(),
    }
