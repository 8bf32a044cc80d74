"""The typed plan: what diffpar will do to each component of a pipeline, as immutable data.

Families produce a `ComponentPlan` per module (every local check done, no collective, no change to the module);
engines read only the plan when they apply it; `diffpar.plan(...)` gathers them in a `ParallelPlan` that prints
as a dry run and whose `describe()` is what the ranks agree on. Nothing here imports torch.distributed or a
model family: this is the vocabulary every layer shares.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _freeze(value):
    """Plain, hashable, rank-comparable form of describe() data (lists -> tuples, dicts -> sorted pairs)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def _thaw(value):
    """JSON-able form of frozen data, for `describe()`."""
    if isinstance(value, tuple):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
            return {k: _thaw(v) for k, v in value}
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class ComponentPlan:
    """What one component (denoiser, text encoder, VAE, ControlNet, cache) gets.

    name: the pipeline attribute ("transformer", "text_encoder_2", "vae") or, for a bare model, its class name.
    role: "denoiser", "text encoder", "vae", "controlnet" or "cache".
    engine: the engine that applies it ("context parallel", "tensor parallel", "vae row split", "cache sync", ...).
    group: the mesh dimensions the engine runs over ("ring x ulysses", "tp", "world", "model copy").
    source: where the plan came from ("diffusers _cp_plan", "diffpar plan", "transformers base_model_tp_plan").
    details: readable lines for the dry run.
    facts: rank-comparable facts (class, sizes, dtype, config), frozen; `describe()` returns them as a dict.
    weight_bytes / weight_bytes_per_rank: parameter bytes of the whole module and of what one rank keeps.
    whole: what stays whole on every rank, and why.
    payload: the engine's own plan object; apply reads only this (never recomputes it).
    """

    name: str
    role: str
    module_class: str
    engine: str
    group: str = "world"
    source: str = ""
    details: tuple[str, ...] = ()
    facts: tuple = ()
    weight_bytes: int = 0
    weight_bytes_per_rank: int = 0
    whole: tuple[str, ...] = ()
    payload: Any = field(default=None, compare=False, repr=False)

    @staticmethod
    def freeze_facts(facts: dict) -> tuple:
        return _freeze(facts)

    def describe(self) -> dict:
        return {
            "role": self.role,
            "class": self.module_class,
            "engine": self.engine,
            "group": self.group,
            "source": self.source,
            "facts": _thaw(self.facts),
        }

    def lines(self) -> list[str]:
        head = f"{self.name} ({self.module_class}): {self.engine}"
        if self.group:
            head += f" over {self.group}"
        if self.source:
            head += f" [{self.source}]"
        out = [head]
        if self.weight_bytes:
            ratio = self.weight_bytes_per_rank / self.weight_bytes
            out.append(
                f"    weights per rank: {_bytes(self.weight_bytes_per_rank)} of {_bytes(self.weight_bytes)} ({ratio:.3f})"
            )
        out.extend(f"    {line}" for line in self.details)
        out.extend(f"    stays whole: {line}" for line in self.whole)
        return out


@dataclass(frozen=True)
class MeshLayout:
    """The degrees, checked against the world once (torchtitan's ParallelDims): dp x ring x ulysses x tp."""

    world_size: int
    dp: int = 1
    ring: int = 1
    ulysses: int = 1
    tp: int = 1
    cfg: int = 1  # > 1: the outer dimension (of size dp) holds the guidance branches, not copies

    @property
    def cp(self) -> int:
        return self.ring * self.ulysses

    @property
    def model_degree(self) -> int:
        return self.cp * self.tp

    def describe(self) -> dict:
        return {"world_size": self.world_size, "dp": self.dp, "cfg": self.cfg, "ring": self.ring,
                "ulysses": self.ulysses, "tp": self.tp}

    def line(self) -> str:
        outer = f"cfg {self.dp}" if self.cfg > 1 else f"dp {self.dp}"
        return f"world {self.world_size} = {outer} x ring {self.ring} x ulysses {self.ulysses} x tp {self.tp}"


@dataclass(frozen=True)
class ParallelPlan:
    """Everything `enable_cache` / `parallelize` will do, computed with no collective and no change to a module.

    `print(plan)` is a dry run; `plan.describe()` is what every rank must agree on before anything changes.
    """

    target_class: str
    layout: MeshLayout | None
    components: tuple[ComponentPlan, ...] = ()
    shims: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    config: tuple = ()
    versions: tuple = ()

    def component(self, name: str) -> ComponentPlan:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"no component {name!r} in this plan; components: {[c.name for c in self.components]}")

    def by_role(self, role: str) -> list[ComponentPlan]:
        return [c for c in self.components if c.role == role]

    def describe(self) -> dict:
        """Flat and JSON-able: one key per component ("denoiser:transformer", "vae:vae", "cache:cache"), so a
        mismatch between ranks names the component that differs."""
        out = {
            "target": self.target_class,
            "layout": None if self.layout is None else self.layout.describe(),
            "shims": list(self.shims),
            "config": _thaw(self.config),
            "versions": _thaw(self.versions),
        }
        for c in self.components:
            out[f"{c.role}:{c.name}"] = c.describe()
        return out

    def __str__(self) -> str:
        lines = [f"diffpar plan for {self.target_class}"]
        lines.append(f"  mesh: {self.layout.line() if self.layout else 'one process (nothing to split)'}")
        for c in self.components:
            lines.extend(f"  {line}" for line in c.lines())
        if self.shims:
            lines.append(f"  diffusers compat shims: {', '.join(self.shims)}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


@dataclass
class ApplyContext:
    """What an extra module's apply step may read besides its own plan: the pipeline and what the denoisers'
    engines set up before it (a ControlNet runs on its transformer's context-parallel config)."""

    pipeline: Any = None
    mesh: Any = None
    denoiser_parallel_configs: dict = field(default_factory=dict)
