"""`ParallelismConfig`: what the user asks for, validated on construction.

Fields may be given directly or inside `parallel_kwargs` (the form cache-dit users write); both end up in
the same fields. Nothing here touches torch.distributed: the world is checked later, in `mesh.ParallelDims`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from diffpar.errors import DiffparError

# Keys accepted inside `parallel_kwargs`, each mapped to the field it sets.
_PARALLEL_KWARGS_FIELDS = (
    "extra_parallel_modules",
    "ulysses_anything",
    "ring_anything",
    "convert_to_fp32",
    "attention_backend",
    "broadcast_latents",
    "vae_split_min_rows",
    "keep_original_text_encoders",
    "timeout_s",
    "check_every_call",
    "verify_weights",
    "cfg_size",
    "weights_from",
)


@dataclass
class ParallelismConfig:
    """How to spread a pipeline over the processes torchrun started.

    ulysses_size / ring_size: context-parallel degrees for the transformer (and ControlNet).
    tp_size: tensor-parallel degree for the transformer.
    cfg_size: 2 splits classifier-free guidance over two rank groups (the outermost mesh dimension): the
        conditional and unconditional branches of each denoising step run on different ranks, and batches split
        over the groups; each group is its own context-/tensor-parallel mesh (docs/cfg.md). None or 1: off.
    ulysses_anything / ring_anything: allow sequence lengths (and, for Ulysses, head counts) that the degree
        does not divide.
    convert_to_fp32: accumulate ring attention partial results in fp32 (diffusers' option).
    attention_backend: a diffusers attention backend name to set on the transformer before parallelizing.
    extra_parallel_modules: text encoders, VAEs, ControlNets (module objects or pipeline attribute names),
        parallelized over the whole world.
    broadcast_latents: every rank draws rank 0's random numbers (default True): at the start of each pipeline
        call the call's generators and torch's global random state get rank 0's state (a broadcast, only when their
        digests, carried by the call's one agreement exchange, differ), so noise drawn in the call is rank 0's;
        `latents` (or images) passed to `prepare_latents` have its outputs broadcast from rank 0. A rank seeded on
        its own, or not at all, still makes rank 0's image.
    vae_split_min_rows: latent rows below which the VAE decodes whole on every rank (None: diffpar decides).
    keep_original_text_encoders: keep a copy of each sharded text encoder's full weights so `detach()` restores
        it bit for bit (costs the full weights' memory; default False: detach says the encoder must be reloaded).
    timeout_s: how long any wait diffpar issues or causes may last (start-up, agreements, the VAE's handshake)
        before every rank gets a clear error naming what waited (default 300 s).
    check_every_call: at the start of every pipeline call (and every call of a bare model diffpar parallelized)
        the ranks compare its arguments (shapes, step count, scalars, prompt and image checksums) in one small
        exchange; a mismatch is a clear error on every rank (default True).
    verify_weights: with every call, also compare a checksum of the weights of the modules that are not sharded
        (for weights changed after enabling, e.g. a LoRA loaded on one rank only; default False).
    weights_from: sharded loading, for modules larger than one device: {component name: safetensors file, or a
        directory of them (with or without an index)}, e.g. {"transformer": "/m/transformer", "text_encoder_2":
        "/m/text_encoder_2"}, plus optionally "device": where the weights go (default: the rank's current CUDA
        device, else the CPU). Each named module (a denoiser, or a text encoder in extra_parallel_modules) must be
        built on the meta device (`with torch.device("meta"): ...from_config(...)`, or accelerate's
        init_empty_weights()); each rank then reads only its tensor-parallel shard of every split weight, as a
        slice of the memory-mapped file, and the rest whole. detach() of such a transformer gathers the FULL
        weights on every rank; a text encoder loaded this way must be reloaded after detach (docs/loading.md).
        weights_from="auto": every module `diffpar.empty_pipeline(directory, ...)` built empty, each from its
        own subfolder of that directory (the recipe of docs/loading.md).
    """

    ulysses_size: int | None = None
    ring_size: int | None = None
    tp_size: int | None = None
    cfg_size: int | None = None
    ulysses_anything: bool = False
    ring_anything: bool = False
    convert_to_fp32: bool = True
    attention_backend: str | None = None
    extra_parallel_modules: list = field(default_factory=list)
    broadcast_latents: bool = True
    vae_split_min_rows: int | None = None
    keep_original_text_encoders: bool = False
    timeout_s: float = 300.0
    check_every_call: bool = True
    verify_weights: bool = False
    weights_from: dict = field(default_factory=dict)
    parallel_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        kwargs = dict(self.parallel_kwargs or {})
        unknown = sorted(set(kwargs) - set(_PARALLEL_KWARGS_FIELDS))
        if unknown:
            raise DiffparError(
                f"ParallelismConfig: unknown parallel_kwargs {unknown}. Accepted keys: {list(_PARALLEL_KWARGS_FIELDS)}."
            )
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        for key, value in kwargs.items():
            current = getattr(self, key)
            is_default = current in ([], {}) if key in ("extra_parallel_modules", "weights_from") else current == defaults.get(key)
            if not is_default and current != value:
                raise DiffparError(
                    f"ParallelismConfig: {key!r} was given both as a field ({current!r}) and in parallel_kwargs "
                    f"({value!r}). Give it once."
                )
            setattr(self, key, value)
        self.parallel_kwargs = {}
        self._validate()

    def _validate(self):
        for name in ("ulysses_size", "ring_size", "tp_size", "cfg_size"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffparError(f"ParallelismConfig: {name} must be a positive integer or None, got {value!r}.")
        for name in ("ulysses_anything", "ring_anything", "convert_to_fp32", "broadcast_latents",
                     "keep_original_text_encoders", "check_every_call", "verify_weights"):
            if not isinstance(getattr(self, name), bool):
                raise DiffparError(f"ParallelismConfig: {name} must be True or False, got {getattr(self, name)!r}.")
        if self.cfg_degree > 2:
            raise DiffparError(
                f"ParallelismConfig: cfg_size={self.cfg_size}: classifier-free guidance has two branches "
                "(conditional and unconditional), so cfg_size is 1 or 2. Use ulysses_size / ring_size / tp_size "
                "for the other ranks."
            )
        if self.ulysses_anything and self.ulysses_degree == 1:
            raise DiffparError("ParallelismConfig: ulysses_anything=True needs ulysses_size > 1.")
        if self.ring_anything and self.ring_degree == 1:
            raise DiffparError("ParallelismConfig: ring_anything=True needs ring_size > 1.")
        if self.ulysses_anything and self.ring_anything:
            raise DiffparError(
                "ParallelismConfig: ulysses_anything and ring_anything cannot both be set (diffusers supports one "
                "uneven mode at a time). Keep the one for the degree you use."
            )
        if (self.ulysses_anything or self.ring_anything) and self.ulysses_degree > 1 and self.ring_degree > 1:
            raise DiffparError(
                "ParallelismConfig: *_anything modes need a single context-parallel kind; with both ulysses_size and "
                "ring_size > 1, use sequence lengths divisible by ulysses_size * ring_size."
            )
        if self.attention_backend is not None and not isinstance(self.attention_backend, str):
            raise DiffparError(
                f"ParallelismConfig: attention_backend must be a diffusers backend name (str), got {self.attention_backend!r}."
            )
        if not isinstance(self.extra_parallel_modules, (list, tuple)):
            self.extra_parallel_modules = [self.extra_parallel_modules]
        self.extra_parallel_modules = list(self.extra_parallel_modules)
        for entry in self.extra_parallel_modules:
            if not isinstance(entry, (str, torch.nn.Module)):
                raise DiffparError(
                    "ParallelismConfig: extra_parallel_modules entries must be modules of the pipeline "
                    f"(e.g. pipe.text_encoder) or their attribute names (e.g. 'text_encoder'), got {type(entry).__name__}."
                )
        self._validate_weights_from()
        timeout = self.timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise DiffparError(f"ParallelismConfig: timeout_s must be a number of seconds > 0, got {timeout!r}.")
        self.timeout_s = float(timeout)
        if self.vae_split_min_rows is not None and (not isinstance(self.vae_split_min_rows, int) or self.vae_split_min_rows < 0):
            raise DiffparError("ParallelismConfig: vae_split_min_rows must be a non-negative integer or None.")

    def _validate_weights_from(self):
        if self.weights_from == "auto":  # resolved when planning (engines/sharded_loading.resolve_auto)
            return
        if not isinstance(self.weights_from, dict):
            raise DiffparError("ParallelismConfig: weights_from must be a dict {component name: safetensors path} "
                               f'or "auto", got {type(self.weights_from).__name__}.')
        for key, value in self.weights_from.items():
            ok = isinstance(value, (str, torch.device)) if key == "device" else isinstance(value, (str, os.PathLike))
            if not isinstance(key, str) or not ok:
                raise DiffparError(
                    f"ParallelismConfig: weights_from[{key!r}] must be a path to a .safetensors file or directory "
                    f"(or, for 'device', a device), got {value!r}.")

    @property
    def ulysses_degree(self) -> int:
        return self.ulysses_size or 1

    @property
    def ring_degree(self) -> int:
        return self.ring_size or 1

    @property
    def tp_degree(self) -> int:
        return self.tp_size or 1

    @property
    def cfg_degree(self) -> int:
        return self.cfg_size or 1

    @property
    def cp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    @property
    def model_degree(self) -> int:
        """Ranks one copy of the transformer is spread over."""
        return self.cp_degree * self.tp_degree

    def describe(self) -> dict:
        """A plain, rank-comparable summary (module objects replaced by their class names)."""
        extra = [e if isinstance(e, str) else type(e).__name__ for e in self.extra_parallel_modules]
        if isinstance(self.weights_from, str):  # "auto"
            loaded = {"weights_from": self.weights_from}
        else:
            loaded = {"weights_from": sorted(k for k in self.weights_from if k != "device")} if self.weights_from else {}
        return {
            "ulysses_size": self.ulysses_degree,
            "ring_size": self.ring_degree,
            "tp_size": self.tp_degree,
            "cfg_size": self.cfg_degree,
            "ulysses_anything": self.ulysses_anything,
            "ring_anything": self.ring_anything,
            "convert_to_fp32": self.convert_to_fp32,
            "attention_backend": self.attention_backend,
            "extra_parallel_modules": extra,
            "broadcast_latents": self.broadcast_latents,
            "vae_split_min_rows": self.vae_split_min_rows,
            "keep_original_text_encoders": self.keep_original_text_encoders,
            "timeout_s": self.timeout_s,
            "check_every_call": self.check_every_call,
            "verify_weights": self.verify_weights,
            **loaded,  # names only: each rank may read its own copy of the files
        }
