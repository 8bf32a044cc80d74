"""Tensor parallelism for text encoders listed in `extra_parallel_modules`.

A text encoder is sharded over the whole world (the group `enable_cache` hands every extra module), whatever
the transformer uses. Each family file says how to find the encoder's layer stacks and gives their plan:
transformers' own `base_model_tp_plan` where the config carries one (decoder LLMs), a plan written here
where it does not (T5, UMT5, CLIP, BERT). A plan maps module paths (`*` = any one path component) to a style:

    colwise      a Linear whose output features are split: no communication
    rowwise      a Linear whose input features are split: one all-reduce, then the bias once
    head_table   an Embedding(n, heads) whose columns are heads (T5's relative-position bias): sliced on dim 1
    replicated   left whole on every rank (per-head norms)

and transformers' `colwise_gather_output` / `rowwise_split_input`, honoured literally (an all-gather, a local
slice) unless the family declares the layer packed (GLM's fused gate_up, chunked in two inside its MLP: each
half is split the same way, so no gather is needed).

Planned layers are grouped by parent (the family's `group`: the immediate parent by default; BERT, whose
pairs sit in sibling modules, groups two levels up with dotted child paths). A parent that is an attention module (the family recognizes it by
class) is split by whole heads (`split_heads`: uneven counts and key/value-head replication included) and
gets its per-rank head counts; any other parent (an MLP) splits its inner features evenly. The result is the
engine's shard description (`engines/tp_shard.py` `ShardPlan`), built for every rank during the local checks,
so any error is raised on every rank before a collective. The tensor-parallel engine then replaces each planned
layer by its shard; the full layers are freed once every rank succeeded (commit), unless
`keep_original_text_encoders` asked to keep them (on the CPU) for an exact detach.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from diffpar.compat.quantized_tensors import is_plain, refusal as quantized_refusal
from diffpar.errors import DiffparError, UnsupportedError
from diffpar.engines.sharded_loading import loaded_later
from diffpar.engines.tensor_parallel import shard_module
from diffpar.engines.tensor_parallel_linear import PARALLEL_LAYER_TYPES
from diffpar.engines.tp_shard import (
    COLUMN,
    ROW,
    AttributeShard,
    HeadShard,
    LayerShard,
    ShardPlan,
    scale_ranges,
    split_heads,
    split_ranges,
)
from diffpar.engines.tp_shard import HEAD_TABLE as HEAD_TABLE_SHARD
from diffpar.families.registry import ExtraModuleAdapter, register_extra_adapter
from diffpar.plan_types import ComponentPlan

logger = logging.getLogger("diffpar")

COLWISE = "colwise"
ROWWISE = "rowwise"
HEAD_TABLE = "head_table"
REPLICATED = "replicated"
COLWISE_GATHER_OUTPUT = "colwise_gather_output"
ROWWISE_SPLIT_INPUT = "rowwise_split_input"

# transformers' TP style names (in `base_model_tp_plan`) -> ours. Others are refused by name.
TRANSFORMERS_STYLES = {
    "colwise": COLWISE,
    "rowwise": ROWWISE,
    # Per-head q/k RMSNorms (Qwen3, Gemma 3): their weight is per head-dim, the same for every head.
    "replicated_with_grad_allreduce": REPLICATED,
    COLWISE_GATHER_OUTPUT: COLWISE_GATHER_OUTPUT,
    ROWWISE_SPLIT_INPUT: ROWWISE_SPLIT_INPUT,
}
_STYLES = {COLWISE, ROWWISE, HEAD_TABLE, REPLICATED, COLWISE_GATHER_OUTPUT, ROWWISE_SPLIT_INPUT}

# Option read from the config object when present: keep the full layers so detach restores them exactly.
KEEP_ORIGINAL_OPTION = "keep_original_text_encoders"


# -- what a family provides ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionLayout:
    """How one attention module names its projections and which attributes carry its head counts."""

    q: str
    k: str
    v: str
    o: str
    head_dim: int
    # Per-rank attribute values the attention's forward reads (e.g. num_key_value_groups, n_heads, inner_dim).
    local_attrs: Callable[[HeadShard], dict]
    head_table: str | None = None
    # Where those attributes live, relative to the attention module ("" = on it). The projection names above
    # may be dotted paths too (BERT: `self.query` ... `output.dense`, the head counts on `self`).
    attrs_path: str = ""


class TextEncoderFamily:
    """One family of text encoders: how to recognize it, where its stacks are, their plan, their attention."""

    name: str = ""
    # The classes this family shards (for the supported table and messages).
    classes: tuple[str, ...] = ()

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def targets(self, module: nn.Module) -> list[tuple[str, dict[str, str]]]:
        """(path of a layer stack inside `module`, its plan relative to that stack) pairs."""
        raise NotImplementedError

    def check_module(self, module: nn.Module) -> None:
        """Family-specific refusals (e.g. an unsupported config). Local, no collectives."""

    def attention_layout(self, parent: nn.Module) -> AttentionLayout | None:
        raise NotImplementedError

    def group(self, path: str) -> tuple[str, str]:
        """(parent path, child path) of a planned layer: layers sharing a parent are split together (an
        attention's projections by heads, an MLP's pair by inner features). Default: the immediate parent; a
        family whose pairs sit in sibling modules (BERT) groups at a higher level and gives dotted child paths."""
        parent, _, child = path.rpartition(".")
        return parent, child

    def packed_parts(self, parent: nn.Module, child: str) -> int:
        """How many equal parts a layer's output is chunked into by its parent's forward (1: not packed)."""
        return 1

    def describe(self, module: nn.Module) -> dict:
        return {}


# Matched by predicate, in registration order, not by class: an encoder is recognized by the decoder stack it holds
# wherever that sits (LlamaModel itself, Qwen3ForCausalLM.model, Mistral3ForConditionalGeneration...language_model).
_FAMILIES: list[TextEncoderFamily] = []


def register_text_encoder_family(family: TextEncoderFamily) -> TextEncoderFamily:
    _FAMILIES.append(family)
    return family


def family_for(module: nn.Module) -> TextEncoderFamily | None:
    for family in _FAMILIES:
        if family.matches(module):
            return family
    return None


def supported_text_encoders() -> list[tuple[str, tuple[str, ...]]]:
    """(family name, classes) for every registered family, for docs and messages."""
    return [(f.name, f.classes) for f in _FAMILIES]


def transformers_plan(config) -> dict[str, str]:
    """The config's `base_model_tp_plan`, styles translated to ours; unknown styles are refused by name."""
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    out = {}
    for pattern, style in plan.items():
        if style not in TRANSFORMERS_STYLES:
            raise UnsupportedError(
                f"{type(config).__name__}.base_model_tp_plan asks for style {style!r} on {pattern!r}, which diffpar "
                f"does not implement (it implements {sorted(TRANSFORMERS_STYLES)}). This encoder cannot be sharded; "
                "remove it from extra_parallel_modules."
            )
        out[pattern] = TRANSFORMERS_STYLES[style]
    return out


# -- the plan for one encoder on one world ---------------------------------------------------------------------
def _expand(module: nn.Module, prefix: str, plan: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Full path -> (style, plan pattern) for every module matched by a plan pattern under `prefix`."""
    base = f"{prefix}." if prefix else ""
    names = [n[len(base):] for n, _ in module.named_modules() if n.startswith(base) and n != prefix]
    found = {}
    for pattern, style in plan.items():
        if style not in _STYLES:
            raise DiffparError(f"text encoder plan: unknown style {style!r} for {pattern!r}.")
        parts = pattern.split(".")
        for name in names:
            name_parts = name.split(".")
            if len(name_parts) == len(parts) and all(fnmatch.fnmatchcase(n, p) for n, p in zip(name_parts, parts)):
                found[base + name] = (style, pattern)
    return found


def _label(module: nn.Module, path: str) -> str:
    return f"{type(module).__name__}.{path}" if path else type(module).__name__


def _check_layer(encoder: nn.Module, path: str, layer: nn.Module, style: str) -> None:
    label = _label(encoder, path)
    if isinstance(layer, PARALLEL_LAYER_TYPES):
        raise DiffparError(
            f"{label} is already a tensor-parallel shard: this encoder was sharded by an earlier enable_cache (and "
            "detached). Its full weights are gone; reload it (e.g. `from_pretrained`) and enable diffpar again."
        )
    wanted = nn.Embedding if style == HEAD_TABLE else nn.Linear
    if type(layer) is not wanted:
        hint = " (LoRA/PEFT adapters: fuse them first, e.g. pipe.fuse_lora())" if "lora" in type(layer).__name__.lower() else ""
        raise UnsupportedError(
            f"{label} is a {type(layer).__name__}, not a plain torch.nn.{wanted.__name__}{hint}: diffpar can only "
            "split plain layers exactly (wrapped layers keep their own weight formats). Remove this "
            "encoder from extra_parallel_modules, or load it unquantized."
        )
    split_dim = 1 if style in (ROWWISE, ROWWISE_SPLIT_INPUT, HEAD_TABLE) else 0
    for pname, p in layer.named_parameters(recurse=False):
        if p.device.type == "meta" and not loaded_later(encoder):  # weights_from reads its shards later
            raise UnsupportedError(
                f"{label}.{pname} is on the meta device (weights not loaded, e.g. sequential CPU offload or a "
                "device_map): diffpar needs the real weights to split them. Load the encoder fully, or remove it "
                "from extra_parallel_modules."
            )
        # The weight may be quantized in a layout diffpar cuts exactly (torchao int8 / float8 per row).
        reason = quantized_refusal(p, split_dim) if pname == "weight" else None
        if reason is not None:
            raise UnsupportedError(f"{label} cannot be split: {reason}. Remove this encoder from "
                                   "extra_parallel_modules, or load it unquantized.")
        if is_plain(p) and not p.is_floating_point() or not is_plain(p) and pname != "weight":
            raise UnsupportedError(
                f"{label}.{pname} is a {type(p.data).__name__} of {p.dtype}, not a plain floating-point tensor "
                "(quantized?): diffpar can only split plain weights. Remove this encoder from extra_parallel_modules."
            )
    if layer._forward_hooks or layer._forward_pre_hooks or hasattr(layer, "_hf_hook") or hasattr(layer, "_diffusers_hook"):
        raise UnsupportedError(
            f"{label} has forward hooks (offloading, adapters or another library's hooks): replacing the layer with "
            "its shard would drop them. Remove those hooks (e.g. do not use sequential CPU offload on this encoder) "
            "or remove it from extra_parallel_modules."
        )


def build_plan(encoder: nn.Module, world: int, family: TextEncoderFamily | None = None) -> ShardPlan:
    """Every rank's shards of `encoder` on `world` ranks; raises DiffparError for anything it cannot split."""
    family = family or family_for(encoder)
    if family is None:
        raise UnsupportedError(f"{type(encoder).__name__} is not a text encoder diffpar can shard.")
    family.check_module(encoder)
    result = ShardPlan(world=world, source=f"{family.name} plan", origin=family.name)
    targets = family.targets(encoder)
    if not targets:
        raise UnsupportedError(f"{type(encoder).__name__}: diffpar found no layer stack to shard in it.")
    for prefix, plan in targets:
        planned = _expand(encoder, prefix, plan)
        if not any(style != REPLICATED for style, _ in planned.values()):
            raise UnsupportedError(
                f"{_label(encoder, prefix)}: its tensor-parallel plan {sorted(plan)} matches none of its layers; "
                "diffpar cannot shard it (a newer transformers layout?)."
            )
        by_parent: dict[str, dict[str, str]] = {}
        for path, (style, _pattern) in planned.items():
            if style == REPLICATED:
                continue
            parent, child = family.group(path)
            _check_layer(encoder, path, encoder.get_submodule(path), style)
            by_parent.setdefault(parent, {})[child] = style
        for parent_path in sorted(by_parent, key=_natural_key):
            _plan_parent(encoder, family, parent_path, by_parent[parent_path], world, result)
    return result


def _natural_key(path: str):
    return [int(p) if p.isdigit() else p for p in path.split(".")]


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _plan_parent(encoder, family, parent_path: str, styles: dict[str, str], world: int, out: ShardPlan) -> None:
    parent = encoder.get_submodule(parent_path) if parent_path else encoder
    layout = family.attention_layout(parent)
    if layout is not None:
        _plan_attention(encoder, parent, parent_path, layout, styles, world, out)
    else:
        _plan_dense(encoder, family, parent, parent_path, styles, world, out)


def _plan_attention(encoder, parent, parent_path, layout: AttentionLayout, styles, world, out: ShardPlan) -> None:
    label = _label(encoder, parent_path)
    expected = {layout.q: COLWISE, layout.k: COLWISE, layout.v: COLWISE, layout.o: ROWWISE}
    if layout.head_table and hasattr(parent, layout.head_table):
        expected[layout.head_table] = HEAD_TABLE
    if styles != expected:
        raise UnsupportedError(
            f"{label}: the plan shards {styles}, but an attention module must shard exactly {expected} (query, key and "
            "value by heads, the output projection by rows) to stay exact."
        )
    d = layout.head_dim
    q_out = parent.get_submodule(layout.q).out_features
    kv_out = parent.get_submodule(layout.k).out_features
    if (q_out % d or kv_out % d or parent.get_submodule(layout.v).out_features != kv_out
            or parent.get_submodule(layout.o).in_features != q_out):
        raise UnsupportedError(f"{label}: projection sizes do not match whole heads of {d} features; cannot split by heads.")
    shards = split_heads(q_out // d, kv_out // d, world, what=f"{label} (query/key-value heads {q_out // d}/{kv_out // d})")
    out.layers += [
        LayerShard(_join(parent_path, layout.q), "column", [scale_ranges([s.q], d) for s in shards]),
        LayerShard(_join(parent_path, layout.k), "column", [scale_ranges([s.kv], d) for s in shards]),
        LayerShard(_join(parent_path, layout.v), "column", [scale_ranges([s.kv], d) for s in shards]),
        LayerShard(_join(parent_path, layout.o), "row", [scale_ranges([s.q], d) for s in shards]),
    ]
    if HEAD_TABLE in styles.values():
        out.layers.append(LayerShard(_join(parent_path, layout.head_table), HEAD_TABLE_SHARD, [[s.q] for s in shards]))
    out.attributes.append(AttributeShard(_join(parent_path, layout.attrs_path) if layout.attrs_path else parent_path, tuple(layout.local_attrs(s) for s in shards)))
    out.heads[parent_path] = [(s.num_q, s.num_kv) for s in shards]


def _plan_dense(encoder, family, parent, parent_path, styles, world, out: ShardPlan) -> None:
    """An MLP: column layers split their outputs, row layers their inputs, all along the same inner features."""
    label = _label(encoder, parent_path)
    if HEAD_TABLE in styles.values() or type(parent).__name__.endswith("Attention") or hasattr(parent, "head_dim"):
        # Split by features, an attention module would lose whole-head boundaries: refuse rather than guess.
        raise UnsupportedError(
            f"{label} ({type(parent).__name__}) looks like an attention module the {family.name} family does not "
            "recognize, so diffpar cannot split it by heads. Remove this encoder from extra_parallel_modules."
        )
    packed = {c: family.packed_parts(parent, c) for c, s in styles.items() if s in (COLWISE, COLWISE_GATHER_OUTPUT)}
    packed = {c: n for c, n in packed.items() if n > 1}
    if packed:
        # transformers gathers a packed layer's output and re-splits it for the row layer; splitting each chunk
        # the same way instead keeps `chunk()` local: no gather, same result.
        styles = {c: {COLWISE_GATHER_OUTPUT: COLWISE, ROWWISE_SPLIT_INPUT: ROWWISE}.get(s, s) for c, s in styles.items()}
    inner = None
    for child, style in styles.items():
        layer = parent.get_submodule(child)
        if style == COLWISE:
            parts = packed.get(child, 1)
            if layer.out_features % parts:
                raise UnsupportedError(f"{label}.{child}: {layer.out_features} outputs do not chunk into {parts} parts.")
            size = layer.out_features // parts
        elif style == ROWWISE:
            size = layer.in_features
        else:
            continue  # literal gather / split-input layers split on their own
        if inner is None:
            inner = size
        elif inner != size:
            raise UnsupportedError(
                f"{label}: its column and row layers do not share one inner size ({inner} vs {size} for {child}); "
                "diffpar cannot pair them."
            )
    kinds = set(styles.values())
    if (COLWISE in kinds) != (ROWWISE in kinds):
        raise UnsupportedError(
            f"{label}: the plan splits {styles}; a split output must be consumed by a row-split layer in the same "
            "module (and a row-split layer fed by a split output), or the result would be a shard, not the model's."
        )
    for child, style in styles.items():
        layer = parent.get_submodule(child)
        size = inner if style in (COLWISE, ROWWISE) else (
            layer.out_features if style == COLWISE_GATHER_OUTPUT else layer.in_features)
        if size < world:
            raise DiffparError(
                f"{_label(encoder, _join(parent_path, child))} has {size} inner features, fewer than the {world} ranks: "
                "every rank needs at least one. Leave this encoder out of extra_parallel_modules."
            )
        path = _join(parent_path, child)
        if style == COLWISE and child in packed:
            ranges = [[(p * inner + a, p * inner + b) for p in range(packed[child])] for a, b in split_ranges(inner, world)]
            out.layers.append(LayerShard(path, COLUMN, ranges))
        elif style == COLWISE:
            out.layers.append(LayerShard(path, COLUMN, [[r] for r in split_ranges(inner, world)]))
        elif style == ROWWISE:
            out.layers.append(LayerShard(path, ROW, [[r] for r in split_ranges(inner, world)]))
        elif style == COLWISE_GATHER_OUTPUT:
            own = split_ranges(layer.out_features, world)
            out.layers.append(LayerShard(path, COLUMN, [[r] for r in own], gather_output=True))
        elif style == ROWWISE_SPLIT_INPUT:
            own = split_ranges(layer.in_features, world)
            out.layers.append(LayerShard(path, ROW, [[r] for r in own], input_is_parallel=False))


# -- applying it -----------------------------------------------------------------------------------------------
def parameter_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


class TextEncoderTensorParallel(ExtraModuleAdapter):
    """`extra_parallel_modules` entries that are text encoders: tensor parallel over the whole world."""

    kind = "text encoder (tensor parallel)"

    def matches(self, module: nn.Module) -> bool:
        return family_for(module) is not None

    def plan(self, module: nn.Module, name: str, world_size: int, config) -> ComponentPlan:
        family = family_for(module)
        sharding = build_plan(module, world_size, family)
        params = list(module.parameters())
        facts = {
            "class": type(module).__name__,
            "family": family.name,
            "n_params": sum(p.numel() for p in params),
            "dtype": str(params[0].dtype) if params else None,
            **family.describe(module),
        }
        accounting = sharding.weight_bytes(module)
        keep = bool(getattr(config, KEEP_ORIGINAL_OPTION, False))
        summary = sharding.summary()
        return ComponentPlan(
            name=name, role="text encoder", module_class=type(module).__name__, engine="tensor parallel",
            group="world", source=f"{family.name} plan",
            details=(
                f"{summary['sharded_layers']} linears split, heads per rank (q, kv): {summary['heads_per_rank']}",
                "detach restores the original weights (kept on CPU)" if keep
                else "full weights freed after sharding: detach says to reload (keep_original_text_encoders=True keeps them)",
            ),
            facts=ComponentPlan.freeze_facts(facts),
            weight_bytes=accounting["full"],
            weight_bytes_per_rank=accounting["per_rank"],
            whole=("embeddings, norms and anything outside the attention and MLP linears",),
            payload=sharding,
        )

    def apply(self, module: nn.Module, plan: ComponentPlan, group, handle, config, context):
        keep = bool(getattr(config, KEEP_ORIGINAL_OPTION, False))
        world = dist.get_world_size(group)
        sharding = plan.payload
        label = plan.name or type(module).__name__
        reason = None
        if not keep:
            reason = (
                f"{label} ({type(module).__name__}) was split over {world} processes and its full weights were freed "
                f"to save memory; it must be reloaded (e.g. {type(module).__name__}.from_pretrained(...)) before it "
                f"runs in one process. Set {KEEP_ORIGINAL_OPTION}=True to keep a CPU copy that detach restores."
            )
        # The full layers are dropped only once every step of enable_cache succeeded (handle.commit), so a failure
        # in a later step restores this encoder exactly.
        shard_module(module, sharding, group, handle,
                     f"{label}: text-encoder tensor parallelism ({sharding.origin}, {world} ranks)",
                     detach="kept" if keep else "dropped", irreversible_reason=reason)
        after = parameter_bytes(module)
        state = {
            **sharding.summary(), "family": sharding.origin, "world_size": world,
            "param_bytes_before": plan.weight_bytes, "param_bytes_after": after, "kept_original": keep,
        }
        logger.info("diffpar: %s sharded over %d ranks (%s): %.1f%% of its parameter bytes per rank.",
                    label, world, sharding.origin, 100.0 * after / max(plan.weight_bytes, 1))
        return state


TEXT_ENCODER_ADAPTER = register_extra_adapter(TextEncoderTensorParallel())
