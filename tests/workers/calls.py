"""Rank-side: every call of a parallel pipeline or model is agreed across ranks before it runs."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

import diffpar
from diffpar.mesh import deferred_ready
from diffpar.testing import tiny_pipelines, tiny_transformers
from diffpar.testing.probes import SplitProbe, collective_shapes_recorded, group_exchanges_counted

CALL = dict(prompt="a red fox in snow", height=32, width=32, num_inference_steps=2, max_sequence_length=16,
            guidance_scale=3.5, output_type="pt")


def _pipe(seed: int = 0):
    pipe = tiny_pipelines.build_tiny_flux_pipeline(seed=seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _enable(pipe, **config):
    config.setdefault("ulysses_size", 2)
    return diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
        extra_parallel_modules=[pipe.vae], **config))


def _timed_error(fn):
    started = time.monotonic()
    try:
        fn()
    except diffpar.DiffparError as exc:
        return {"rank": dist.get_rank(), "error": type(exc).__name__, "message": str(exc),
                "seconds": time.monotonic() - started}
    return {"rank": dist.get_rank(), "error": None, "seconds": time.monotonic() - started}


def pipeline_call_differs(field: str, values: list) -> dict:
    """Rank r calls the pipeline with `field=values[r % len(values)]`; everything else equal."""
    pipe = _pipe()
    handle = _enable(pipe)
    kwargs = dict(CALL, **{field: values[dist.get_rank() % len(values)]})
    try:
        with torch.no_grad():
            result = _timed_error(lambda: pipe(**kwargs, generator=torch.Generator().manual_seed(0)))
        # The pipeline still works afterwards when the ranks agree (nothing was left half-done).
        with torch.no_grad():
            pipe(**CALL, generator=torch.Generator().manual_seed(0))
        result["calls_agreed"] = handle.state("call_checker").calls
    finally:
        handle.detach()
    return result


def pipeline_calls_agree() -> dict:
    """Equal calls: the image matches one process, and each call was agreed once (ranks seeded differently:
    generators are compared by device only, their states are made rank 0's)."""
    with torch.no_grad():
        reference = _pipe()(**CALL, generator=torch.Generator().manual_seed(0)).images
    pipe = _pipe()
    handle = _enable(pipe)
    try:
        with torch.no_grad():
            out = pipe(**CALL, generator=torch.Generator().manual_seed(dist.get_rank())).images
            pipe(**CALL, generator=torch.Generator().manual_seed(dist.get_rank()))
        return {"rank": dist.get_rank(), "diff": (out - reference).abs().max().item(),
                "calls_agreed": handle.state("call_checker").calls}
    finally:
        handle.detach()


def weights_differ_at_enable() -> dict:
    pipe = _pipe(seed=dist.get_rank())  # another checkpoint on every rank
    return _timed_error(lambda: _enable(pipe))


def weights_changed_after_enable(verify: bool) -> dict:
    pipe = _pipe()
    handle = _enable(pipe, verify_weights=verify)
    if dist.get_rank() == 1:
        with torch.no_grad():  # e.g. a LoRA fused on one rank only
            pipe.transformer.proj_out.weight.mul_(1.5)
    try:
        with torch.no_grad():
            result = _timed_error(lambda: pipe(**CALL, generator=torch.Generator().manual_seed(0)))
    finally:
        handle.detach()
    return result


def model_inputs_differ(seq_by_rank: list[int]) -> dict:
    model, make_inputs = tiny_transformers.build("flux")
    handle = diffpar.enable_cache(model, parallelism_config=diffpar.ParallelismConfig(ulysses_size=2))
    inputs = make_inputs(seq=seq_by_rank[dist.get_rank() % len(seq_by_rank)], text=8)
    try:
        with torch.no_grad():
            result = _timed_error(lambda: model(**inputs))
        result["calls_agreed"] = handle.state("call_checker").calls
    finally:
        handle.detach()
    return result


def rank_skips_the_call(timeout_s: float) -> dict:
    """Rank 1 never calls the pipeline: rank 0 must fail after `timeout_s`, not hang. Rank 0 raises (so the
    test pool replaces these processes: rank 0's timed-out exchange must not pair with a later test's)."""
    pipe = _pipe()
    handle = _enable(pipe, timeout_s=timeout_s)
    try:
        if dist.get_rank() == 1:
            return {"rank": 1, "skipped": True}
        with torch.no_grad():
            pipe(**CALL, generator=torch.Generator().manual_seed(0))
        return {"rank": 0, "error": None}
    finally:
        handle.detach()


def random_states_without_argument_check(mismatch: bool = False) -> dict:
    """`check_every_call=False`: the call's random states are still made rank 0's (the image matches one process
    although each rank seeds its own generator and its global random state); with `mismatch`, rank 1 passes two
    generators where rank 0 passes one, which every rank reports clearly (no collective of mismatched sizes)."""
    reference_pipe = _pipe()
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = reference_pipe(**CALL, generator=torch.Generator().manual_seed(0)).images
    pipe = _pipe()
    handle = _enable(pipe, check_every_call=False)
    torch.manual_seed(100 + dist.get_rank())  # each rank's global random state its own
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(rank)
    if mismatch and rank == 1:
        generator = [generator, torch.Generator().manual_seed(7)]
    try:
        if mismatch:
            return _timed_error(lambda: pipe(**CALL, generator=generator))
        with torch.no_grad(), SplitProbe(pipe.transformer) as probe:
            out = pipe(**CALL, generator=generator).images
        state = torch.get_rng_state().to(torch.float64)
        gathered = [torch.empty_like(state) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, state)
        return {"rank": rank, "diff": (out - reference).abs().max().item(), "split": probe.summary(),
                "split_reference": reference_probe.summary(),
                "calls_agreed": handle.state("call_checker").calls,
                "global_states_equal": all(torch.equal(g, gathered[0]) for g in gathered)}
    finally:
        handle.detach()


_COUNTED = ("all_gather", "all_reduce", "broadcast", "all_to_all_single", "all_gather_into_tensor", "send", "recv")


def exchanges_before_the_call(check_every_call: bool, seed_per_rank: bool) -> dict:
    """Collectives from the start of a pipeline call to its first line (`check_inputs`): the per-call exchange,
    issued and in flight (settled later, at prepare_latents); and every collective of the call, in order.
    Two calls: the first one agrees the global random states (each rank's own so far), the second one is counted.
    The image must match one process (the broadcast is skipped only when the states are already equal)."""
    reference_pipe = _pipe()
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = reference_pipe(**CALL, generator=torch.Generator().manual_seed(0)).images
    pipe = _pipe()
    handle = _enable(pipe, check_every_call=check_every_call)
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # each rank's global random state its own until the first call
    counts: dict = {}
    marks: list = []
    order: list = []
    originals = {name: getattr(dist, name) for name in _COUNTED}
    inside = []  # a dist-level collective being counted: the group method it calls is not a second one

    def counting(name):
        def call(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            order.append(name)
            inside.append(name)
            try:
                return originals[name](*args, **kwargs)
            finally:
                inside.pop()
        return call

    def group_exchange():  # the call agreement's exchange, issued on the group itself (compat.collectives)
        if not inside:
            counts["exchange"] = counts.get("exchange", 0) + 1
            order.append("exchange")

    check_inputs = pipe.check_inputs

    def marked_check_inputs(*args, **kwargs):
        marks.append(dict(counts))
        return check_inputs(*args, **kwargs)

    try:
        with torch.no_grad():
            pipe(**CALL, generator=torch.Generator().manual_seed(rank if seed_per_rank else 0))
        for name in _COUNTED:
            setattr(dist, name, counting(name))
        pipe.check_inputs = marked_check_inputs
        try:
            with torch.no_grad(), group_exchanges_counted(group_exchange), SplitProbe(pipe.transformer) as probe:
                out = pipe(**CALL, generator=torch.Generator().manual_seed(rank if seed_per_rank else 0)).images
        finally:
            for name, fn in originals.items():
                setattr(dist, name, fn)
            del pipe.check_inputs
        return {"rank": rank, "diff": (out - reference).abs().max().item(), "before_call": marks[0],
                "order": order, "split": probe.summary(), "split_reference": reference_probe.summary(),
                "calls_agreed": handle.state("call_checker").calls,
                "deferred_calls": handle.state("call_checker").deferred_calls}
    finally:
        handle.detach()


def draw_before_the_first_parallel_step(exchange_in_flight: bool) -> dict:
    """The pipeline draws from torch's global random state in its first line (`check_inputs`), before the call's
    agreement is settled (at prepare_latents), while each rank's global state is its own: rank 1 runs the call again
    from rank 0's states (rank 0's draws were rank 0's); its later calls agree at their start. Both ways the
    exchange can be found at prepare_latents, forced: still in flight (rank 0 starts late, so rank 1 draws its noise
    first and settles at the transformer) or arrived (rank 1 waits for it in check_inputs, and settles there)."""
    reference_pipe = _pipe()
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = reference_pipe(**CALL, generator=torch.Generator().manual_seed(0)).images
    pipe = _pipe()
    handle = _enable(pipe)
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # each rank's global random state its own
    check_inputs = pipe.check_inputs
    drawn = []

    def drawing_check_inputs(*args, **kwargs):
        drawn.append(torch.rand(1).item())
        if not exchange_in_flight:
            deadline = time.monotonic() + 30
            while not deferred_ready() and time.monotonic() < deadline:
                time.sleep(0.001)
        return check_inputs(*args, **kwargs)

    pipe.check_inputs = drawing_check_inputs
    images = []

    def call():
        images.append(pipe(**CALL, generator=torch.Generator().manual_seed(0)).images)

    try:
        dist.barrier()
        if exchange_in_flight and rank == 0:
            time.sleep(0.5)
        with torch.no_grad(), SplitProbe(pipe.transformer) as probe:
            first = _timed_error(call)
        with torch.no_grad():
            second = _timed_error(call)
        # Rank 0 drew twice (it never runs a call again), rank 1 three times: padded to one size for the gather.
        draws = torch.tensor(drawn + [float("nan")] * (3 - len(drawn)), dtype=torch.float64)
        gathered = [torch.empty_like(draws) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, draws)
        checker = handle.state("call_checker")
        return {"rank": rank, "first": first, "second": second, "draws": [g.tolist() for g in gathered],
                "diff": (images[0] - reference).abs().max().item(), "split": probe.summary(),
                "split_reference": reference_probe.summary(), "deferred_calls": checker.deferred_calls,
                "draws_early": checker.draws_early, "restarts": checker.restarts, "calls_agreed": checker.calls,
                "speculated": checker.speculated_calls, "settles_at_prepare": checker.settles_at_prepare}
    finally:
        del pipe.check_inputs
        handle.detach()


def keywords_in_another_order() -> dict:
    """Rank 1 passes the same keywords in the reverse order: the same call, agreed (descriptions are ordered by
    name), and the image matches one process."""
    reference_pipe = _pipe()
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = reference_pipe(**CALL, generator=torch.Generator().manual_seed(0)).images
    pipe = _pipe()
    handle = _enable(pipe)
    items = list(CALL.items()) + [("generator", torch.Generator().manual_seed(0))]
    if dist.get_rank() == 1:
        items.reverse()
    try:
        with torch.no_grad(), SplitProbe(pipe.transformer) as probe:
            out = pipe(**dict(items)).images
        return {"rank": dist.get_rank(), "diff": (out - reference).abs().max().item(), "split": probe.summary(),
                "split_reference": reference_probe.summary(), "calls_agreed": handle.state("call_checker").calls}
    finally:
        handle.detach()


def one_rank_raises_before_the_settle_point() -> dict:
    """Rank 1's call fails in the pipeline's own input check (no prompt), after the exchange was issued and before
    the call reached its settle point; rank 0's call is valid. Both get the mismatch (rank 1's chained to its own
    error), neither waits in a later collective; then equal calls run."""
    pipe = _pipe()
    handle = _enable(pipe)
    kwargs = dict(CALL)
    if dist.get_rank() == 1:
        kwargs["prompt"] = None
    try:
        with torch.no_grad():
            started = time.monotonic()
            try:
                pipe(**kwargs, generator=torch.Generator().manual_seed(0))
                result = {"error": None}
            except Exception as exc:  # noqa: BLE001 (reported to the test)
                result = {"error": type(exc).__name__, "message": str(exc),
                          "cause": type(exc.__cause__).__name__ if exc.__cause__ else None}
            result["seconds"] = time.monotonic() - started
            pipe(**CALL, generator=torch.Generator().manual_seed(0))
        result.update(rank=dist.get_rank(), calls_agreed=handle.state("call_checker").calls)
        return result
    finally:
        handle.detach()


def latents_of_each_rank_become_rank_0s() -> dict:
    """Each rank passes latents of its own (seeded by rank): prepare_latents was given a tensor, so its outputs are
    still broadcast from rank 0, and the image is the one-process image from rank 0's latents. Counted: the
    broadcasts of the call (FLUX: the latents and their position ids)."""
    reference_pipe = _pipe()
    rank = dist.get_rank()
    latents_of = [reference_pipe.prepare_latents(1, reference_pipe.transformer.config.in_channels // 4,
                                                 CALL["height"], CALL["width"], torch.float32, torch.device("cpu"),
                                                 torch.Generator().manual_seed(seed))[0] for seed in (0, rank)]
    rank0_latents, own = latents_of
    own_differs = bool((own - rank0_latents).abs().max() > 0)
    own_before = own.clone()
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = reference_pipe(**CALL, latents=rank0_latents.clone(),
                                   generator=torch.Generator().manual_seed(0)).images
    pipe = _pipe()
    handle = _enable(pipe)
    try:
        with torch.no_grad(), collective_shapes_recorded("broadcast") as broadcasts, SplitProbe(pipe.transformer) as probe:
            out = pipe(**CALL, latents=own, generator=torch.Generator().manual_seed(0)).images
        return {"rank": rank, "diff": (out - reference).abs().max().item(), "broadcasts": broadcasts,
                "split": probe.summary(), "split_reference": reference_probe.summary(), "own_differs": own_differs,
                "own_untouched": torch.equal(own, own_before)}
    finally:
        handle.detach()


def generators_of_each_rank(generators: int) -> dict:
    """Each rank passes `generators` generators (`num_images_per_prompt`), seeded its own way, and its own global
    random state: every rank makes rank 0's images. One generator's states travel inside the call's exchange (no
    broadcast); more do not fit its room, so their digest travels and rank 0's states are broadcast once.
    Counted: the call's broadcasts (dist-level) and its exchanges."""
    rank = dist.get_rank()
    call = dict(CALL, num_images_per_prompt=generators)
    reference_pipe = _pipe()
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = reference_pipe(**call, generator=[torch.Generator().manual_seed(i)
                                                      for i in range(generators)]).images
    pipe = _pipe()
    world = dist.get_world_size()
    handle = _enable(pipe, ulysses_size=world)  # 4 heads; Ulysses x Ring needs diffusers 0.37+
    torch.manual_seed(100 + rank)
    exchanges = []
    try:
        with torch.no_grad(), collective_shapes_recorded("broadcast") as broadcasts, \
                group_exchanges_counted(lambda: exchanges.append(1)), SplitProbe(pipe.transformer) as probe:
            out = pipe(**call, generator=[torch.Generator().manual_seed(10 * rank + i)
                                          for i in range(generators)]).images
        state = torch.get_rng_state().to(torch.float64)
        gathered = [torch.empty_like(state) for _ in range(world)]
        dist.all_gather(gathered, state)
        return {"rank": rank, "diff": (out - reference).abs().max().item(), "broadcasts": broadcasts,
                "exchanges": len(exchanges), "split": probe.summary(), "split_reference": reference_probe.summary(),
                "global_states_equal": all(torch.equal(g, gathered[0]) for g in gathered)}
    finally:
        handle.detach()


def noise_drawn_before_the_exchange_arrives(seed_per_rank: bool) -> dict:
    """A call given prompt embeddings reaches prepare_latents quickly; rank 0 starts late, so rank 1's exchange is
    still in flight there: rank 1 draws its noise before settling (speculates), and settles at the transformer.
    Same seeds: its noise is rank 0's, nothing more happens. A seed per rank: rank 1 runs the call again from rank
    0's states, on its own, and settles at prepare_latents from then on. Every image is the one-process image."""
    reference_pipe = _pipe()
    with torch.no_grad():
        prompt_embeds, pooled, _ = reference_pipe.encode_prompt(CALL["prompt"], None, max_sequence_length=16)
    call = dict(CALL, prompt=None, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled)
    with torch.no_grad(), SplitProbe(reference_pipe.transformer) as reference_probe:
        reference = reference_pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe = _pipe()
    handle = _enable(pipe)
    checker = handle.state("call_checker")
    rank = dist.get_rank()
    torch.manual_seed(100)  # the global states equal: only the generators may differ
    try:
        dist.barrier()
        if rank == 0:
            time.sleep(0.5)
        with torch.no_grad(), SplitProbe(pipe.transformer) as probe:
            out = pipe(**call, generator=torch.Generator().manual_seed(rank if seed_per_rank else 0)).images
        return {"rank": rank, "diff": (out - reference).abs().max().item(), "split": probe.summary(),
                "split_reference": reference_probe.summary(), "speculated": checker.speculated_calls,
                "restarts": checker.restarts, "settles_at_prepare": checker.settles_at_prepare,
                "draws_early": checker.draws_early}
    finally:
        handle.detach()
