"""VAE parallelism: decode and encode split by image rows over the whole world, exactly.

A VAE listed in `extra_parallel_modules` gets its `decoder.forward` and `encoder.forward` wrapped: the input is
cut into horizontal bands (one per rank, uneven heights allowed), every layer on the path runs on the band with
the record of its class (`ModuleRule`, engines/vae_split.py), and the output bands are gathered on every rank. The
result equals the ordinary one-process decode of the same input: the same convolutions on the same rows, GroupNorm
statistics of the whole image, attention over every key. See docs/vae.md.

Each supported VAE class is one `register_vae` entry, in one small file per family beside this one: its parts,
whether it is a video VAE, and the records of its module classes (shared kinds in rules.py). Because the wrap sits
on the inner `decoder` / `encoder` modules, diffusers' own `enable_slicing()` and `enable_tiling()` keep working:
each slice or tile the VAE hands its decoder is itself split over the ranks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from diffpar.engines.vae_split import ModuleRule, apply_row_split, plan_row_split, rule_in_table, split_state_of
from diffpar.errors import DiffparError
from diffpar.families.registry import ClassRegistry, ExtraModuleAdapter, register_extra_adapter
from diffpar.families.vaes.rules import TORCH_RULES
from diffpar.plan_types import ComponentPlan


@dataclass(frozen=True)
class VaeClass:
    """One supported VAE class, as data: what the adapter splits and the records of every module on the way."""

    parts: tuple[str, ...]  # submodules whose forward receives the (latent or image) tensor to split
    video: bool  # input is (B, C, T, H, W); split is spatial (H), frames and causal caches stay whole per band
    rules: dict[str, ModuleRule] = field(default_factory=dict)  # module class name -> record (torch's included)

    def rule_for(self, module: nn.Module) -> ModuleRule | None:
        return rule_in_table(self.rules, module)


VAE_CLASSES: ClassRegistry[VaeClass] = ClassRegistry("VAE class")


def register_vae(*class_names: str, rules: dict[str, ModuleRule], video: bool,
                 parts: tuple[str, ...] = ("encoder", "decoder")) -> VaeClass:
    """Register VAE classes: their parts, video flag and the records of their own module classes. A module class
    not in `rules` nor in torch's records (rules.TORCH_RULES) makes plan refuse the VAE."""
    return VAE_CLASSES.register(class_names, VaeClass(parts, video, {**TORCH_RULES, **rules}))


class VaeAdapter(ExtraModuleAdapter):
    kind = "vae"

    def matches(self, module: nn.Module) -> bool:
        return VAE_CLASSES.lookup(module) is not None

    def parts(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        entry = VAE_CLASSES.lookup(module)
        return [(p, getattr(module, p)) for p in entry.parts if isinstance(getattr(module, p, None), nn.Module)]

    def plan(self, module: nn.Module, name: str, world_size: int, config) -> ComponentPlan:
        cls_name = type(module).__name__
        if split_state_of(module) is not None:
            raise DiffparError(
                f"extra_parallel_modules: this {cls_name} is already split by diffpar, through another pipeline that "
                "shares it (e.g. one built from pipe.components). Wrapping it twice would split bands again. Call "
                "diffpar.disable_cache(<that pipeline>) first, or leave the VAE out of this one's "
                "extra_parallel_modules: it is split for every pipeline that shares it."
            )
        entry = VAE_CLASSES.lookup(module)
        parts = self.parts(module)
        split = plan_row_split(module, parts, entry.rule_for)
        params = list(module.parameters())
        module_config = dict(getattr(module, "config", {}) or {})
        facts = {
            "class": cls_name,
            "video": entry.video,
            "config": sorted((k, repr(v)) for k, v in module_config.items() if not k.startswith("_")),
            "n_params": sum(p.numel() for p in params),
            "dtype": str(params[0].dtype) if params else None,
        }
        weight_bytes = sum(p.numel() * p.element_size() for p in params)
        return ComponentPlan(
            name=name, role="vae", module_class=cls_name, engine="vae row split", group="world",
            source="diffpar VAE rules",
            details=(
                f"{' and '.join(kind for _, kind in split.parts)} split by rows over {world_size} ranks: "
                f"{split.halo_layers} halo convolutions, {split.whole_image_norms} whole-image norms, "
                f"{split.attention_gathers} attention key gathers",
                f"bands of at least {split.min_band_rows} rows; encoder row stride {split.down_factor}",
            ),
            facts=ComponentPlan.freeze_facts(facts),
            weight_bytes=weight_bytes, weight_bytes_per_rank=weight_bytes,
            whole=("weights (replicated: the split is over image rows, not parameters)",),
            payload=split,
        )

    def apply(self, module: nn.Module, plan: ComponentPlan, group, handle, config, context):
        label = plan.name or type(module).__name__
        return apply_row_split(module, plan.payload, group, handle, label, getattr(config, "vae_split_min_rows", None),
                               getattr(config, "timeout_s", None))


register_extra_adapter(VaeAdapter())
