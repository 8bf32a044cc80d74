"""Rank-side functions for harness and error-path tests."""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

import diffpar
from diffpar.testing import tiny_transformers


def whoami():
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "pid": os.getpid(),
            "threads": torch.get_num_threads()}


def raise_on(rank: int, message: str = "boom"):
    if dist.get_rank() == rank:
        raise ValueError(message)
    dist.barrier()  # the other ranks wait in a collective the failing rank never enters
    return "unreachable"


def hang_on(rank: int):
    """Rank `rank` skips the all-reduce its peers enter: the classic distributed hang."""
    if dist.get_rank() != rank:
        t = torch.ones(1)
        dist.all_reduce(t)
    else:
        time.sleep(3600)


def sleep(seconds: float):
    time.sleep(seconds)
    return dist.get_rank()


class TinyPipeline:
    """Just enough of a DiffusionPipeline for enable_cache's checks: `components` and attributes."""

    def __init__(self, **modules):
        self.components = modules
        for k, v in modules.items():
            setattr(self, k, v)


def enable_with(config_by_rank: list[dict] | None = None, config: dict | None = None, model: str = "flux",
                model_kwargs: dict | None = None, pipeline: bool = False, extra: list | None = None,
                foreign_extra: bool = False):
    """Call enable_cache with (possibly rank-specific) arguments; return the handle's steps or raise."""
    cfg = dict(config_by_rank[dist.get_rank()] if config_by_rank else config)
    if model == "no-plan":
        from diffusers import UNet2DModel

        net = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                          block_out_channels=(8, 8), norm_num_groups=4,
                          down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    else:
        net, _ = tiny_transformers.build(model, **(model_kwargs or {}))
    target = net
    if pipeline:
        target = TinyPipeline(transformer=net, text_encoder=torch.nn.Linear(4, 4))
        entries = []
        for e in extra or []:
            entries.append(getattr(target, e[1:]) if e.startswith("@") else e)  # "@name" -> the module object
        if foreign_extra:
            entries.append(torch.nn.Linear(4, 4))  # not a module of this pipeline
        cfg["extra_parallel_modules"] = entries
    handle = diffpar.enable_cache(target, parallelism_config=diffpar.ParallelismConfig(**cfg))
    steps = handle.step_names
    handle.detach()
    return steps


def agree_with_error_on(rank: int):
    """A local failure of any kind on one rank: every rank must raise from the one agreement collective."""
    from diffpar.mesh import agree

    local = KeyError("only this rank failed its local checks") if dist.get_rank() == rank else None
    agree("test", {"same": 1}, local)
    return "no error"
