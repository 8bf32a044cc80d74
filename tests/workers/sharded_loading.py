"""Rank-side checks for sharded loading (`weights_from`): a tiny Flux pipeline saved with save_pretrained, the
same built on the meta device, each rank reading only its shards from the files."""
from __future__ import annotations

import copy
import os
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import diffpar
from diffpar import applying
from diffpar.compat.diffusers_cp import SHARED_SHIMS
from diffpar.engines import sharded_loading
from diffpar.testing import tiny_pipelines, tiny_transformers
from diffpar.testing.probes import SplitProbe

LOADED = ("transformer", "text_encoder", "text_encoder_2")
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon"]


# -- counting what is read from the files ---------------------------------------------------------------------
class _CountingSlice:
    def __init__(self, view, key, log):
        self._view, self._key, self._log = view, key, log

    def get_shape(self):
        return self._view.get_shape()

    def __getitem__(self, index):
        tensor = self._view[index]
        self._log.append((self._key, tuple(tensor.shape), tensor.numel() * tensor.element_size()))
        return tensor


class _CountingFile:
    def __init__(self, opened, log, path):
        self._opened, self._log, self._path = opened, log, path

    def __enter__(self):
        self._opened.__enter__()
        return self

    def __exit__(self, *exc):
        return self._opened.__exit__(*exc)

    def keys(self):
        return self._opened.keys()

    def get_slice(self, key):
        return _CountingSlice(self._opened.get_slice(key), (self._path, key), self._log)

    def get_tensor(self, key):
        tensor = self._opened.get_tensor(key)
        self._log.append(((self._path, key), tuple(tensor.shape), tensor.numel() * tensor.element_size()))
        return tensor


class _WatchAllocations(TorchDispatchMode):
    """Records the shape of every real (not meta) tensor a torch op allocates: an output whose storage is not
    any input's (views of the memory-mapped file, and slices of them, share its storage and allocate nothing)."""

    def __init__(self):
        super().__init__()
        self.shapes = {}  # shape -> the op that allocated it first

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and \
                    t.untyped_storage().data_ptr() not in inputs:
                self.shapes.setdefault(tuple(t.shape), f"{func} at {_caller()}")
        return out


def _caller() -> str:
    import traceback

    frames = [f for f in traceback.extract_stack()[:-3] if "/diffpar/" in f.filename or "/safetensors" in f.filename]
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[-3:][::-1])


# -- building ---------------------------------------------------------------------------------------------------
def _save(reference, directory: str) -> None:
    """Rank 0 writes the modules with save_pretrained (safetensors); the others wait for it."""
    if dist.get_rank() == 0:
        for name in LOADED:
            getattr(reference, name).save_pretrained(os.path.join(directory, name))
    dist.barrier()


def _meta_pipeline(reference, names=LOADED, on_meta_device: bool = False):
    """The reference's pipeline with `names` built from their configs without weights."""
    from accelerate import init_empty_weights
    from diffusers import FluxPipeline, ModelMixin

    def empty(module):
        config = module.config
        if isinstance(module, ModelMixin):
            return type(module).from_config(config)
        return type(module)._from_config(config, attn_implementation="sdpa", dtype=torch.float32)

    built = {}
    for name in names:
        context = torch.device("meta") if on_meta_device else init_empty_weights()
        with context:
            built[name] = empty(getattr(reference, name)).eval()
    return FluxPipeline(**{**reference.components, **built})


def _transformer_inputs():
    _, make_inputs = tiny_transformers.build("flux", heads=4)
    inputs = make_inputs(seq=16, text=7)
    inputs["guidance"] = torch.full((1,), 3.5)
    return inputs


def _encode(pipe):
    embeds, pooled, _ids = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=16)
    return embeds, pooled


def _loading_report(handle, pipe, reads, watch):
    """Per loaded module ("modules"): the bytes the files gave this rank vs its plan, sharded weights read whole,
    meta left; how many shapes only a whole sharded weight has ("forbidden_shapes") and every op that allocated a
    tensor of one ("full_size_allocations")."""
    plans = {c.name: c.payload for c in handle.plan.by_role("weights")}
    full_shapes = {r.key: r.shape for plan in plans.values() for r in plan.reads}
    sliced = {plan.name: plan.sharded_keys for plan in plans.values()}
    whole_shapes = {r.shape for plan in plans.values() for r in plan.reads if r.dim is None}
    rank_of = {name: handle.state(f"weights:{name}")["rank"] for name in plans}
    slice_shapes = set()  # what this rank legitimately allocates for its slices
    for name, plan in plans.items():
        for r in plan.reads:
            if r.dim is not None:
                shape = list(r.shape)
                shape[r.dim] = sum(b - a for a, b in r.ranges[rank_of[name]])
                slice_shapes.add(tuple(shape))
    # Shapes only a whole sharded weight has: no op may allocate one while loading.
    forbidden = {full_shapes[k] for keys in sliced.values() for k in keys} - whole_shapes - slice_shapes
    per_module = {}
    for name, plan in plans.items():
        files = {r.file for r in plan.reads}
        mine = [(k, shape, n) for (f, k), shape, n in reads if f in files]
        state = handle.state(f"weights:{name}")
        per_module[name] = {
            "read_bytes": sum(n for _, _, n in mine),
            "state_bytes": state["read_bytes"],
            "plan_bytes": plan.bytes_per_rank[state["rank"]],
            "full_bytes": plan.full_bytes,
            "sliced_whole": [k for k, shape, _ in mine if k in plan.sharded_keys and shape == full_shapes[k]],
            "sliced_count": len(plan.sharded_keys),
            "meta_left": [n for n, p in getattr(pipe, name).named_parameters() if p.is_meta],
            "held_bytes": sum(p.numel() * p.element_size() for p in getattr(pipe, name).parameters()),
        }
    return {"modules": per_module, "forbidden_shapes": len(forbidden),
            "full_size_allocations": sorted((s, watch.shapes[s]) for s in set(watch.shapes) & forbidden)}


def _enable_watching_loads(pipe, parallel):
    """`enable_cache(pipe, parallelism_config=parallel)` with every safetensors read counted (the `reads` list) and
    every allocation's shape watched; returns (handle, reads, watch) for _loading_report."""
    reads = []
    real_open = sharded_loading.safe_open
    sharded_loading.safe_open = lambda path, *a, **k: _CountingFile(real_open(path, *a, **k), reads, path)
    watch = _WatchAllocations()
    try:
        with watch:
            handle = diffpar.enable_cache(pipe, parallelism_config=parallel)
    finally:
        sharded_loading.safe_open = real_open
    return handle, reads, watch


def load_and_compare(directory: str, config: dict):
    """One process (normally loaded) vs the meta-built pipeline with `weights_from`, per rank: outputs, bytes read,
    shapes allocated, the split, and detach."""
    reference = tiny_pipelines.build_tiny_flux_pipeline()
    _save(reference, directory)
    pipe = _meta_pipeline(reference)
    inputs = _transformer_inputs()
    with torch.no_grad():
        ref_embeds = _encode(reference)
        with SplitProbe(reference.transformer) as probe_reference:
            ref_out = reference.transformer(**copy.deepcopy(inputs))[0]
    parallel = diffpar.ParallelismConfig(
        **config, extra_parallel_modules=["text_encoder", "text_encoder_2"],
        weights_from={name: os.path.join(directory, name) for name in LOADED})
    handle, reads, watch = _enable_watching_loads(pipe, parallel)
    with torch.no_grad():
        embeds = _encode(pipe)
        with SplitProbe(pipe.transformer) as probe:
            out = pipe.transformer(**copy.deepcopy(inputs))[0]
    result = {
        "rank": dist.get_rank(),
        "diff": (out - ref_out).abs().max().item(),
        "embed_diffs": [(a - b).abs().max().item() for a, b in zip(embeds, ref_embeds)],
        **_loading_report(handle, pipe, reads, watch),
        "split": probe.summary(),
        "split_reference": probe_reference.summary(),
    }
    try:
        handle.detach()
        result["detach_error"] = None
    except RuntimeError as exc:
        result["detach_error"] = str(exc)
    # The transformer's detach gathers every shard back: the whole model, equal to the files, on every rank.
    ref_state, state = reference.transformer.state_dict(), pipe.transformer.state_dict()
    result["detach_equal"] = set(state) == set(ref_state) and all(
        torch.equal(state[k], ref_state[k]) for k in ref_state)
    return result


def rollback_leaves_meta(directory: str, config: dict, where: str = "after"):
    """A failure on rank 1 rolls every rank back to the meta modules it was given: `where="after"` in the
    call-agreement step (every weight read), `where="during"` inside the loading itself, after a few tensors of
    the second module were read (a partial load)."""
    reference = tiny_pipelines.build_tiny_flux_pipeline()
    _save(reference, directory)
    pipe = _meta_pipeline(reference)
    before = {name: {n: (type(m).__name__, tuple(p.shape) if (p := getattr(m, "weight", None)) is not None else None)
                     for n, m in getattr(pipe, name).named_modules()} for name in LOADED}
    real_step, real_materialise = applying.apply_step, sharded_loading.materialise
    calls = []

    def failing(step, fn, *args, **kwargs):
        if step == "call agreement" and dist.get_rank() == 1:
            raise RuntimeError("injected failure")
        return real_step(step, fn, *args, **kwargs)

    def failing_read(*args, **kwargs):
        calls.append(1)
        if len(calls) == 80 and dist.get_rank() == 1:  # the transformer has 66 tensors: inside the next module
            raise RuntimeError("injected failure")
        return real_materialise(*args, **kwargs)

    if where == "after":
        applying.apply_step = failing
    else:
        sharded_loading.materialise = failing_read
    error = None
    try:
        diffpar.enable_cache(pipe, parallelism_config=diffpar.ParallelismConfig(
            **config, extra_parallel_modules=["text_encoder", "text_encoder_2"],
            weights_from={name: os.path.join(directory, name) for name in LOADED}))
    except Exception as exc:  # noqa: BLE001 - the test asserts the message
        error = str(exc)
    finally:
        applying.apply_step, sharded_loading.materialise = real_step, real_materialise
    after = {name: {n: (type(m).__name__, tuple(p.shape) if (p := getattr(m, "weight", None)) is not None else None)
                    for n, m in getattr(pipe, name).named_modules()} for name in LOADED}
    return {
        "rank": dist.get_rank(),
        "error": error,
        "structure_equal": before == after,
        "all_meta": all(p.is_meta for name in LOADED for p in getattr(pipe, name).parameters()),
        "reads": len(calls),
    }


# -- the recipe: diffpar.empty_pipeline(saved directory) + weights_from="auto" ------------------------------------
EMPTY = ("transformer", "text_encoder", "text_encoder_2")  # the VAE, tokenizers and scheduler load normally


def _save_pipeline(directory: str) -> None:
    """Rank 0 saves a tiny Flux pipeline with save_pretrained (model_index.json + one subfolder per component)."""
    if dist.get_rank() == 0:
        tiny_pipelines.build_tiny_flux_pipeline().save_pretrained(directory)
    dist.barrier()


def _image(pipe):
    with torch.no_grad():
        return pipe(prompt=PROMPTS[1], height=32, width=32, num_inference_steps=2, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0), output_type="pt", guidance_scale=3.5).images


def _recipe_config(config: dict):
    return diffpar.ParallelismConfig(**config, extra_parallel_modules=["text_encoder", "text_encoder_2", "vae"],
                                     weights_from="auto")


def recipe_from_directory(directory: str, config: dict):
    """`FluxPipeline.from_pretrained(directory)` in one process vs `diffpar.empty_pipeline(directory)` +
    `weights_from="auto"` on every rank: the image, the bytes each rank read, the shapes allocated, the split."""
    from diffusers import FluxPipeline

    _save_pipeline(directory)
    reference = FluxPipeline.from_pretrained(directory)
    reference.set_progress_bar_config(disable=True)
    with SplitProbe(reference.transformer) as probe_reference:
        ref_image = _image(reference)
    pipe = diffpar.empty_pipeline(directory, EMPTY)
    pipe.set_progress_bar_config(disable=True)
    built_meta = {name: all(p.is_meta for p in getattr(pipe, name).parameters()) for name in EMPTY}
    handle, reads, watch = _enable_watching_loads(pipe, _recipe_config(config))
    with SplitProbe(pipe.transformer) as probe:
        image = _image(pipe)
    result = {
        "rank": dist.get_rank(),
        "built_meta": built_meta,
        "loaded": sorted(c.name for c in handle.plan.by_role("weights")),
        "vae_engine": next(c.engine for c in handle.plan.components if c.name == "vae"),
        "diff": (image - ref_image).abs().max().item(),
        **_loading_report(handle, pipe, reads, watch),
        "split": probe.summary(),
        "split_reference": probe_reference.summary(),
    }
    try:
        handle.detach()
    except RuntimeError:  # the text encoders say they must be reloaded (test_meta_pipeline_reads_only_its_shards)
        pass
    return result


def _parameters(pipe) -> dict:
    """Every parameter and buffer of the empty modules: where it lives, its shape and dtype, and a real buffer's
    value (a meta tensor has none)."""
    return {f"{name}.{key}": (t.device.type, tuple(t.shape), t.dtype, None if t.is_meta else t.clone())
            for name in EMPTY for key, t in [*getattr(pipe, name).named_parameters(),
                                             *getattr(pipe, name).named_buffers()]}


def _same(a: dict, b: dict) -> list[str]:
    def equal(x, y):
        return x[:3] == y[:3] and (x[3] is None) == (y[3] is None) and (x[3] is None or torch.equal(x[3], y[3]))

    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or not equal(a[k], b[k]))


def fail_after_loading(directory: str, config: dict, fail_ranks: list[int]):
    """The loading step fails on `fail_ranks` right after it read every module (the harshest point: all weights
    real): every rank raises, fast; the empty modules are exactly as empty_pipeline built them (meta back), the
    structure (hooks, processors, classes) as before; and a second enable_cache then loads and runs normally."""
    from diffusers import FluxPipeline

    from workers.rollback import _structure

    _save_pipeline(directory)
    pipe = diffpar.empty_pipeline(directory, EMPTY)
    pipe.set_progress_bar_config(disable=True)
    parameters, structure = _parameters(pipe), _structure(pipe)
    real_load, loaded = sharded_loading.apply_loading, []

    def failing_load(load, rank, handle):
        state = real_load(load, rank, handle)
        loaded.append(load.name)
        if len(loaded) == len(EMPTY) and dist.get_rank() in fail_ranks:
            raise RuntimeError("injected failure after the loading step")
        return state

    sharded_loading.apply_loading = failing_load
    started, error = time.monotonic(), None
    try:
        diffpar.enable_cache(pipe, parallelism_config=_recipe_config(config))
    except Exception as exc:  # noqa: BLE001 - the test asserts the message
        error = f"{type(exc).__name__}: {exc}"
    finally:
        sharded_loading.apply_loading = real_load
    seconds = time.monotonic() - started
    result = {
        "rank": dist.get_rank(),
        "error": error,
        "seconds": seconds,
        "loaded": loaded,
        "changed_parameters": _same(parameters, _parameters(pipe))[:5],
        "changed_structure": [k for k in set(structure) | set(_structure(pipe))
                              if structure.get(k) != _structure(pipe).get(k)][:5],
        "shims_active": SHARED_SHIMS.active,
    }
    # The rolled-back pipeline is as good as a fresh one: enabling again loads it, and the image is right.
    reference = FluxPipeline.from_pretrained(directory)
    reference.set_progress_bar_config(disable=True)
    handle = diffpar.enable_cache(pipe, parallelism_config=_recipe_config(config))
    result["second_diff"] = (_image(pipe) - _image(reference)).abs().max().item()
    try:
        handle.detach()
    except RuntimeError:
        pass
    return result
