"""SD3 / SD3.5 ControlNets (`SD3ControlNetModel`, `SD3MultiControlNetModel`), context parallel with the transformer.

The plan mirrors diffpar's SD3 transformer plan (families/transformers/sd3.py): image tokens are split as they leave
`pos_embed` (positional embedding added per token on the whole latent, so the split is exact), the condition as
it leaves `pos_embed_input` (the same patchify, so the same tokens), the prompt as it leaves `context_embedder`.
Residuals are the blocks' image tokens: sharded like the transformer's. SD3.5 "large" ControlNets without a
`pos_embed` or `context_embedder` get the transformer's patch embedding from their pipeline (a copy); if it is
missing, the 3-D `hidden_states` are split at the ControlNet's input instead, and there is no prompt stream.

SD3's `JointAttnProcessor2_0` calls SDPA directly; as for the transformer, each attention gets diffpar's
`SD3ContextParallelAttnProcessor` while parallel (same projections and norms, attention through diffusers'
dispatcher), and detach restores the original processor objects.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import split_input
from diffpar.families.controlnets.base import ControlNetFamily, register_controlnet_family


def _sd3_plan(net) -> dict:
    output = {0: split_input(split_dim=1, expected_dims=3, split_output=True)}
    plan = {"pos_embed_input": output}
    if net.pos_embed is not None:
        plan["pos_embed"] = output
    else:
        plan[""] = {"hidden_states": split_input(split_dim=1, expected_dims=3)}
    if net.context_embedder is not None:
        plan["context_embedder"] = output
    return plan


def _replacements():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from diffpar.families.transformers.sd3 import SD3ContextParallelAttnProcessor

    return {JointAttnProcessor2_0: SD3ContextParallelAttnProcessor}


def _sd3_check(net, config) -> None:
    """The transformer's context-parallel checks, run as the processors will be once replaced (then put back)."""
    from diffpar.errors import UnsupportedError
    from diffpar.engines.context_parallel import check_context_parallel

    replacements = _replacements()
    swapped, unknown = [], []
    for name, module in net.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None:
            continue
        if type(processor) in replacements:
            swapped.append((module, processor))
        elif not hasattr(processor, "_parallel_config"):
            unknown.append(f"{name}: {type(processor).__name__}")
    if unknown:
        raise UnsupportedError(
            f"these attention processors have no context-parallel version in diffpar: {sorted(unknown)}. Remove what "
            "installed them (e.g. unfuse_qkv_projections()) before enable_cache."
        )
    try:
        for module, old in swapped:
            module.processor = replacements[type(old)]()
        check_context_parallel(net, config)
    finally:
        for module, old in swapped:
            module.processor = old


def _sd3_prepare(net, config, handle, label: str) -> None:
    from diffpar.families.transformers.attention_processors import replace_attention_processors

    replace_attention_processors(net, _replacements(), handle, label, type(net).__name__)


register_controlnet_family(
    "SD3ControlNetModel", ControlNetFamily("sd3", _sd3_plan, check=_sd3_check, prepare=_sd3_prepare)
)
