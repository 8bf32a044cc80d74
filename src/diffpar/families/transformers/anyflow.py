"""AnyFlow (`AnyFlowTransformer3DModel`, bidirectional) and AnyFlow-FAR (`AnyFlowFARTransformer3DModel`, causal):
our plans; diffusers ships none.

AnyFlow's blocks are Wan 2.1's (self-attention with 3-D RoPE, cross-attention to the prompt, MLP, six modulation
vectors) with a per-frame timestep: the condition embedder repeats each frame's embedding over the frame's tokens,
so the blocks' modulation `temb` is (B, tokens, 6, dim) and the output's shift / scale is (B, tokens, dim).

Context-parallel plan: the video tokens split where they enter `blocks.0`, the modulation with them at every block
(`blocks.*`), the RoPE table as it leaves `rope` (a dict {"query", "key"} of (1, 1, tokens, head_dim / 2) complex
tables, which diffusers' output hooks cannot reach: a forward hook on `rope` takes this rank's rows, cut exactly as
the tokens are), and the tokens gathered after `norm_out` (a per-token LayerNorm), so the per-token output
modulation and projection run on the whole sequence. The prompt stays whole: each `attn2` computes locally (its
processor's class with no parallel config). Forward changes (undone on detach): the `rope` hook and the local
cross-attention processors.

AnyFlow-FAR is refused (see FAR_REFUSAL): its self-attention runs on the flex backend through a causal BlockMask
over the whole frame-autoregressive layout and a KV cache the pipeline allocates for every head.

Tensor parallelism (AnyFlow): Wan's plan (the same module names: heads split by q/k/v columns, RMSNorms across
heads, MLP columns then rows, the modulation projection gathered).
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp import uneven_path_for
from diffpar.compat.diffusers_cp_hooks import gather_output, shard, split_input
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.ltx import local_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan
from diffpar.families.transformers.wan import _wan as wan_tp_plan


def _rope_rows_hook(model):
    """Forward hook on `rope`: this rank's rows (dim 2: tokens) of the {"query", "key"} tables while parallel."""

    def hook(module, args, output):
        parallel_config = getattr(model, "_parallel_config", None)
        if parallel_config is None or parallel_config.context_parallel_config is None:
            return output
        cp = parallel_config.context_parallel_config
        parts = cp.ulysses_degree * cp.ring_degree
        chosen = getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False)
        if not chosen and any(v.shape[2] % parts for v in output.values()):
            # `rope` runs before `blocks.0`, whose split hook switches a call whose tokens the degree does not
            # divide to the uneven path, or refuses it naming the video tokens where the release has none: switch
            # now so the tables are cut as the tokens will be (the model's pre-forward hook puts the configured
            # mode back for the next call), or leave them whole for that refusal.
            path = uneven_path_for(cp)
            if path is None:
                return output
            setattr(cp, path, True)
        return {k: shard(v, 2, cp) for k, v in output.items()}

    return hook


def prepare_anyflow(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_anyflow import AnyFlowCrossAttnProcessor

    local_attention_processors(model, ("blocks.*.attn2",), (AnyFlowCrossAttnProcessor,), handle, name)
    hooks = []
    handle.add(f"{name}: split the RoPE tables with the tokens", lambda: [h.remove() for h in hooks])
    hooks.append(model.rope.register_forward_hook(_rope_rows_hook(model)))


@register_cp_plan("AnyFlowTransformer3DModel", prepare=prepare_anyflow,
                  hook_splits=("rope(query and key tables, rows cut as the tokens)",), tokens="video")
def anyflow_cp_plan(model) -> dict:
    if not len(model.blocks):
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    return {
        "blocks.0": {"hidden_states": split_input(split_dim=1, expected_dims=3)},
        # Per-token modulation (B, tokens, 6, dim): passed whole to every block, split at each.
        "blocks.*": {"temb": split_input(split_dim=1, expected_dims=4)},
        "norm_out": gather_output(gather_dim=1, expected_dims=3),
    }


register_tp_plan("AnyFlowTransformer3DModel")(wan_tp_plan)


FAR_REFUSAL = (
    "its self-attention runs on the flex backend through a frame-autoregressive causal BlockMask built over the "
    "whole video (clean and noisy chunks), and generation attends through a KV cache the pipeline allocates with "
    "config.num_attention_heads heads"
)


def _refuse_far(model, what: str):
    raise UnsupportedError(
        f"{what} for {type(model).__name__}: {FAR_REFUSAL}. A sequence split would cut that mask and cache (diffusers' "
        "context-parallel attention has no flex BlockMask path), and a head split would leave each rank's keys short "
        "of the cache's heads. Run the FAR transformer whole on each process (parallelize the text encoder and VAE "
        "through extra_parallel_modules), or use the bidirectional AnyFlowTransformer3DModel, which has both plans."
    )


@register_cp_plan("AnyFlowFARTransformer3DModel")
def anyflow_far_cp_plan(model) -> dict:
    _refuse_far(model, "context parallelism")


@register_tp_plan("AnyFlowFARTransformer3DModel")
def _anyflow_far_tp(model) -> TensorParallelPlan:
    _refuse_far(model, "tp_size")
