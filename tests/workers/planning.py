"""Rank-side: `enable_cache` / `parallelize` apply exactly the plan `diffpar.plan` describes."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_transformers


def _tokens_in_first_attention(model, inputs) -> int:
    """Sequence length entering the first attention module of one forward (image + text tokens)."""
    seen = []
    first = next(m for m in model.modules() if hasattr(m, "processor"))

    def hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        extra = kwargs.get("encoder_hidden_states")
        seen.append(hidden.shape[1] + (extra.shape[1] if extra is not None else 0))

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**copy.deepcopy(inputs))
    finally:
        handle.remove()
    return seen[0]


def applied_plan() -> dict:
    model, make_inputs = tiny_transformers.build("flux")
    inputs = make_inputs(seq=16, text=8)
    whole = _tokens_in_first_attention(model, inputs)
    config = diffpar.ParallelismConfig(ulysses_size=2)
    dry_run = diffpar.plan(model, parallelism_config=config).describe()
    handle = diffpar.enable_cache(model, parallelism_config=config)
    tokens = _tokens_in_first_attention(model, inputs)
    applied = handle.plan.describe()
    handle.detach()
    handle2 = diffpar.parallelize(model, config)
    same_path = handle2.plan.describe() == applied and torch.equal(
        torch.tensor(_tokens_in_first_attention(model, inputs)), torch.tensor(tokens))
    handle2.detach()
    return {"rank": dist.get_rank(), "dry_run": dry_run, "handle_plan": applied, "parallelize_same_path": same_path,
            "tokens_in_attention": tokens, "tokens_whole": whole}
