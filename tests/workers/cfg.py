"""Rank-side runs for CFG and batch parallelism: one process vs `enable_cache(pipe, cfg_size=2, ...)`."""
from __future__ import annotations

import torch
import torch.distributed as dist
import wrapt

import diffpar
from diffpar.testing import tiny_cfg_pipelines
from workers.end_to_end import ranks_identical


class ForwardCounter:
    """Counts the denoiser forwards this rank really ran, and their batch sizes: a pre-hook on the output
    projection, inside every wrapper (a placeholder or a skipped call never reaches it)."""

    def __init__(self, transformer):
        self.batches, self.tokens = [], []
        self._hook = transformer.proj_out.register_forward_pre_hook(self._seen)

    def _seen(self, module, args):
        self.batches.append(int(args[0].shape[0]))
        self.tokens.append(int(args[0].shape[1]) if args[0].dim() >= 2 else None)

    def remove(self):
        self._hook.remove()


def _run(kind, pipe, call_kwargs, **options):
    with torch.no_grad():
        return tiny_cfg_pipelines.images(kind, pipe(**call_kwargs(**options))).float()


def cfg_equivalence(kind: str, config: dict, batch: int = 1, guidance: bool = True, steps: int = 2):
    """The image of a guided call on this world vs one process, with what each rank's denoiser computed."""
    options = dict(batch=batch, guidance=guidance, steps=steps)
    reference_pipe, call_kwargs = tiny_cfg_pipelines.build(kind)
    reference_pipe.set_progress_bar_config(disable=True)
    counter = ForwardCounter(reference_pipe.transformer)
    reference = _run(kind, reference_pipe, call_kwargs, **options)
    counter.remove()
    reference_batches = counter.batches
    del reference_pipe

    pipe, call_kwargs = tiny_cfg_pipelines.build(kind)
    pipe.set_progress_bar_config(disable=True)
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(**config))
    try:
        counter = ForwardCounter(pipe.transformer)
        out = _run(kind, pipe, call_kwargs, **options)
        counter.remove()
        first_batches = counter.batches
        state = handle.states.get("cfg")
        first = None if state is None else dict(vars(state.counters["transformer"]))
        counter = ForwardCounter(pipe.transformer)
        again = _run(kind, pipe, call_kwargs, **options)
        counter_again = counter
        counter.remove()
        second = None if state is None else dict(vars(state.counters["transformer"]))
    except BaseException:
        handle.detach(strict=False)
        raise
    mesh = handle.state("mesh")
    result = {
        "rank": dist.get_rank(),
        "group": mesh.get_coordinate()[0],
        "diff": (out - reference).abs().max().item(),
        "finite": bool(torch.isfinite(out).all()),
        "repeat_diff": (again - out).abs().max().item(),
        "ranks_identical": ranks_identical(out),
        "batches": first_batches,
        "again_batches": counter_again.batches,
        "again_placeholders": None if second is None else second["placeholders"] - first["placeholders"],
        "split_from_first_step": None if second is None else second.get("split_from_first_step", 0),
        "reference_batches": reference_batches,
        "mode": None if state is None else state.mode,
        "exchanges": None if first is None else first["exchanges"],
        "placeholders": None if first is None else first["placeholders"],
        "steps": handle.step_names,
    }
    handle.detach()
    own = vars(pipe.transformer)  # diffpar's wrappers gone (diffusers' hook registry may keep its own forward)
    result["detached"] = not isinstance(own.get("forward"), wrapt.ObjectProxy) and "cache_context" not in own
    after = _run(kind, pipe, call_kwargs, **options)
    result["detach_diff"] = (after - reference).abs().max().item()
    return result


def refused_pipeline(config: dict):
    """A pipeline whose guidance pattern diffpar does not know (SD3 with a ControlNet): every rank must refuse
    before anything changed."""
    from diffpar.testing import tiny_controlnets

    pipe, _ = tiny_controlnets.build_pipeline("sd3")
    before = (dict(vars(pipe.transformer)).keys(), dict(vars(pipe)).keys())
    try:
        diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(**config))
    except diffpar.DiffparError as exc:
        after = (dict(vars(pipe.transformer)).keys(), dict(vars(pipe)).keys())
        return {"error": str(exc), "unchanged": before == after, "handle": hasattr(pipe, "_diffpar_handle")}
    return {"error": None}


def _flux_transformer_inputs() -> dict:
    """One seeded call of the tiny Flux transformer of tiny_cfg_pipelines (16 image and 8 text tokens)."""
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]),
                return_dict=False)


def broken_pattern():
    """A denoising loop that, after a guided step, makes two cond calls in a row: every rank raises, none blends."""
    pipe, _ = tiny_cfg_pipelines.build("flux")
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(cfg_size=2))
    transformer = pipe.transformer
    inputs = _flux_transformer_inputs()
    try:
        with torch.no_grad():
            for branch in ("cond", "uncond", "cond", "cond"):
                with transformer.cache_context(branch):
                    transformer(**inputs)
    except diffpar.DiffparError as exc:
        return {"error": str(exc)}
    finally:
        handle.detach()
    return {"error": None}


def wrong_guidance_flag():
    """The pipeline says guidance is on (its __call__'s do_true_cfg) but makes two cond calls in a row: after a
    first call learned the output template, the second splits from its first step, and every rank raises."""
    pipe, _ = tiny_cfg_pipelines.build("flux")
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(cfg_size=2))
    transformer = pipe.transformer
    inputs = _flux_transformer_inputs()

    def __call__(self, do_true_cfg, branches):  # stands for the pipeline's own __call__ (the flag is its local)
        self.prepare_latents(1, 4, 32, 32, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
        for branch in branches:
            with transformer.cache_context(branch):
                transformer(**inputs)

    try:
        with torch.no_grad():
            __call__(pipe, True, ("cond", "uncond"))  # learns the template
            __call__(pipe, True, ("cond", "cond"))
    except diffpar.DiffparError as exc:
        return {"error": str(exc), "split_from_first_step": handle.state("cfg").counters["transformer"]
                .split_from_first_step}
    finally:
        handle.detach()
    return {"error": None}


def _decisions(pipe):
    from diffpar.cache import cache_stats

    return [(d.context, d.step, d.computed, d.diff) for d in cache_stats(pipe).decisions]


def cfg_cache_equivalence(kind: str, config: dict, cache: dict, builder: dict, steps: int = 6):
    """A cache under cfg: the image, and each cache context's decisions (and the measure they used) vs one
    process with the same cache."""
    reference_pipe, call_kwargs = tiny_cfg_pipelines.build(kind, **builder)
    reference_pipe.set_progress_bar_config(disable=True)
    diffpar.enable_cache(reference_pipe, cache_config=diffpar.DBCacheConfig(**cache))  # one process: cache only
    reference = _run(kind, reference_pipe, call_kwargs, steps=steps)
    reference_decisions = _decisions(reference_pipe)
    diffpar.disable_cache(reference_pipe)

    pipe, call_kwargs = tiny_cfg_pipelines.build(kind, **builder)
    pipe.set_progress_bar_config(disable=True)
    handle = diffpar.enable_cache(pipe, cache_config=diffpar.DBCacheConfig(**cache),
                                  parallelism_config=diffpar.ParallelismConfig(**config))
    try:
        out = _run(kind, pipe, call_kwargs, steps=steps)
        decisions = _decisions(pipe)
    finally:
        handle.detach()
    return {
        "rank": dist.get_rank(),
        "group": handle.state("mesh").get_coordinate()[0],
        "diff": (out - reference).abs().max().item(),
        "decisions": decisions,
        "reference_decisions": reference_decisions,
        "cache_group_size": handle.state("cache").group_size,
        "computed_forwards": handle.state("cfg").counters["transformer"].computed,
    }


def two_experts_equivalence(config: dict, steps: int = 4):
    """Wan 2.2 with its low-noise expert (`transformer_2`): two calls of the pipeline on this world vs one process,
    with the forwards (batch, tokens into proj_out) each expert really ran on this rank, per call."""
    kind, options = "wan22", dict(steps=steps)
    reference_pipe, call_kwargs = tiny_cfg_pipelines.build(kind)
    reference_pipe.set_progress_bar_config(disable=True)
    counters = {n: ForwardCounter(getattr(reference_pipe, n)) for n in ("transformer", "transformer_2")}
    reference = _run(kind, reference_pipe, call_kwargs, **options)
    reference_seen = {n: (c.batches, c.tokens) for n, c in counters.items()}
    del reference_pipe

    pipe, call_kwargs = tiny_cfg_pipelines.build(kind)
    pipe.set_progress_bar_config(disable=True)
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(**config))
    calls = []
    try:
        for _ in range(2):
            counters = {n: ForwardCounter(getattr(pipe, n)) for n in ("transformer", "transformer_2")}
            out = _run(kind, pipe, call_kwargs, **options)
            for c in counters.values():
                c.remove()
            calls.append({"diff": (out - reference).abs().max().item(), "finite": bool(torch.isfinite(out).all()),
                          "seen": {n: (c.batches, c.tokens) for n, c in counters.items()}})
        state = handle.state("cfg")
        split_first = {n: c.split_from_first_step for n, c in state.counters.items()}
        mesh = handle.state("mesh")
    finally:
        handle.detach()
    return {"rank": dist.get_rank(), "group": mesh.get_coordinate()[0], "calls": calls,
            "reference_seen": reference_seen, "split_from_first_step": split_first}


def guidance_switch(kind: str, steps: int = 2):
    """Guided, unguided, guided again on one parallel pipeline (same shapes): each call vs one process, with the
    forwards this rank ran per call. The pipeline says before each call whether guidance is on."""
    sequence = (True, False, True)
    reference_pipe, call_kwargs = tiny_cfg_pipelines.build(kind)
    reference_pipe.set_progress_bar_config(disable=True)
    references = {g: _run(kind, reference_pipe, call_kwargs, guidance=g, steps=steps) for g in (True, False)}
    del reference_pipe
    pipe, call_kwargs = tiny_cfg_pipelines.build(kind)
    pipe.set_progress_bar_config(disable=True)
    handle = diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(cfg_size=2))
    calls = []
    try:
        for guided in sequence:
            counter = ForwardCounter(pipe.transformer)
            out = _run(kind, pipe, call_kwargs, guidance=guided, steps=steps)
            counter.remove()
            calls.append({"guided": guided, "diff": (out - references[guided]).abs().max().item(),
                          "batches": counter.batches})
        mesh = handle.state("mesh")
    finally:
        handle.detach()
    return {"rank": dist.get_rank(), "group": mesh.get_coordinate()[0], "calls": calls}
