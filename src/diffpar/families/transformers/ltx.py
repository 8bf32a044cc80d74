"""LTX-Video (`LTXVideoTransformer3DModel`): our context-parallel plan (it replaces diffusers' own) and the
tensor-parallel plan.

Why not diffusers' `_cp_plan`: it splits the prompt and its padding mask over the ranks and sends the
cross-attention through the context-parallel attention too. Under Ulysses the (B, heads, Q, K) mask the
processor builds keeps every head while the all-to-all leaves each rank a part of them, so attention fails on
shapes ("output with shape [2, 1, 512, 16] doesn't match the broadcast shape [2, 2, 512, 16]").

Our plan: split the video tokens (and a per-token timestep, as the image-to-video pipelines pass) where they enter
the model, the RoPE table (cos, sin) as it leaves `rope`; gather after `proj_out`. The prompt stays whole on every
rank, so the cross-attention (`attn2`: video shard -> every prompt key, with its mask) runs locally, with no
communication, exactly as in one process. Forward change, undone on detach: each `attn2` gets a processor of
its own class that never passes the parallel config on (`local_attention_processors`).
"""
from __future__ import annotations

import copy
import fnmatch

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan

_LOCAL_CLASSES: dict[type, type] = {}


def _local_class(cls: type) -> type:
    """`cls` with a parallel config that is always None: attention over keys every rank holds whole, computed
    locally. It still has the attribute, so the engine's setting it (and restoring it) is harmless."""
    if cls not in _LOCAL_CLASSES:
        def _get(self):
            return None

        def _set(self, value):
            pass

        _LOCAL_CLASSES[cls] = type(f"Local{cls.__name__}", (cls,), {
            "__doc__": f"{cls.__name__} computing attention on this rank only (keys whole on every rank).",
            "_parallel_config": property(_get, _set),
        })
    return _LOCAL_CLASSES[cls]


def local_attention_processors(model, patterns: tuple[str, ...], expected: tuple[type, ...], handle, name: str):
    """Every attention under the fnmatch `patterns` computes locally (its processor's class, with no parallel
    config); undo restores the original processor objects. Refuses processors of other classes (IP-Adapter,
    fused projections, ...): diffpar has not checked them."""
    targets, unknown = [], []
    for module_name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not any(fnmatch.fnmatchcase(module_name, p) for p in patterns):
            continue
        if type(processor) in expected:
            targets.append((module, processor))
        elif type(processor) not in _LOCAL_CLASSES.values():
            unknown.append(f"{module_name}: {type(processor).__name__}")
    if unknown:
        raise UnsupportedError(
            f"{type(model).__name__}: these attention processors have no context-parallel version in diffpar: "
            f"{sorted(unknown)}. Context parallelism supports the model's default processors "
            f"({sorted(t.__name__ for t in expected)}). Remove what installed them before enable_cache."
        )

    def restore():
        for module, old in targets:
            module.processor = old

    handle.add(f"{name}: local cross-attention processors", restore)
    for module, old in targets:
        new = copy.copy(old)
        new.__class__ = _local_class(type(old))
        module.processor = new


def prepare_ltx(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

    local_attention_processors(model, ("transformer_blocks.*.attn2",), (LTXVideoAttnProcessor,), handle, name)


@register_cp_plan("LTXVideoTransformer3DModel", prepare=prepare_ltx, overrides_native=True)
def ltx_cp_plan(model) -> dict:
    tokens = split_input(split_dim=1, expected_dims=3)
    rope = split_input(split_dim=1, expected_dims=3, split_output=True)
    return {
        # A (B, tokens) timestep (image-to-video: conditioning tokens get timestep 0) is split with the tokens; a
        # (B,) one is not 2-D and diffusers leaves it whole.
        "": {"hidden_states": tokens, "timestep": split_input(split_dim=1, expected_dims=2)},
        "rope": {0: rope, 1: rope},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("LTXVideoTransformer3DModel")
def ltx_tp_plan(model) -> TensorParallelPlan:
    # The self-attention (attn1) stays whole: its RoPE table spans the whole inner width (one column per query
    # channel, applied before the split into heads), so a rank holding some heads would need the matching columns
    # of the table, and diffusers' processor applies the whole table. The cross-attention, the MLP and the
    # modulation are split.
    block = {
        "attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise", "attn2.to_out.0": "rowwise",
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
    }
    norms = {n: None for n in ("attn2.norm_q", "attn2.norm_k")}  # RMSNorms across heads
    linears = present(model, block, "transformer_blocks")
    linears["time_embed.linear"] = GATHER  # the 6 modulation vectors of every block
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"transformer_blocks.*.attn2": ATTN_ATTRS},
        sharded_norms=tuple(present(model, norms, "transformer_blocks")),
    )
