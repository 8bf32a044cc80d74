"""ConsisID (`ConsisIDTransformer3DModel`): context- and tensor-parallel plans; diffusers ships neither.

CogVideoX's blocks (cogvideox.py: same split of text and video at the first block, the RoPE table split at the
model's input, the same dispatcher attention processor), plus identity conditioning: the local facial extractor
runs on the face features before the blocks (whole on every rank), and after every `cross_attn_interval`-th block a
perceiver cross-attention adds face information to each video token (queries from the video shard, keys and values
from the whole face embedding: local, exact on a shard).

After the blocks the forward concatenates [text, video], normalizes, and slices the video back off with the whole
prompt's length, which a rank holding [text shard, video shard] would cut at the wrong place. So both outputs of the
last block are gathered (a forward hook, removed on detach); the final norm and projection then run whole, as do
the perceiver cross-attention after the last block (if there is one) and nothing else.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import unshard
from diffpar.engines.tp_shard import Packed
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.cogvideox import (
    cogvideox_block_tp,
    first_block_entry,
    prepare_cogvideox,
    rope_entry,
)
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan


def gather_block_outputs(model, block, indices: tuple[int, ...], handle, name: str, why: str) -> None:
    """Gather outputs `indices` of `block` (a tuple of sequence tensors) along the tokens, with a forward hook
    removed on detach: for forwards that re-slice the sequence after the blocks by whole-sequence positions."""

    def hook(module, args, output):
        parallel_config = getattr(model, "_parallel_config", None)
        if parallel_config is None:
            return output
        cp = parallel_config.context_parallel_config
        return tuple(unshard(x.contiguous(), 1, cp) if i in indices else x for i, x in enumerate(output))

    hooks = []
    handle.add(f"{name}: {why}", lambda: [h.remove() for h in hooks])
    hooks.append(block.register_forward_hook(hook))


def prepare_consisid(model, config, handle, name: str) -> None:
    prepare_cogvideox(model, config, handle, name)
    gather_block_outputs(model, model.transformer_blocks[-1], (0, 1), handle, name,
                         "gather the last block's video and text tokens")


@register_cp_plan("ConsisIDTransformer3DModel", prepare=prepare_consisid,
                  hook_gathers=("transformer_blocks[-1] (video and text tokens)",))
def consisid_cp_plan(model) -> dict:
    if not len(model.transformer_blocks):
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    return {"": {"image_rotary_emb": rope_entry()}, "transformer_blocks.0": first_block_entry()}


@register_tp_plan("ConsisIDTransformer3DModel")
def _consisid_tp(model) -> TensorParallelPlan:
    linears, attrs = cogvideox_block_tp(model)
    crosses = getattr(model, "perceiver_cross_attention", None)
    if crosses is not None and len(crosses):
        inner = crosses[0].heads * crosses[0].dim_head
        # Face cross-attention: heads split; to_kv holds [k, v], each split by heads.
        linears.update({
            "perceiver_cross_attention.*.to_q": "colwise",
            "perceiver_cross_attention.*.to_kv": Packed("colwise", (inner, inner)),
            "perceiver_cross_attention.*.to_out": "rowwise",
        })
        attrs["perceiver_cross_attention.*"] = ("heads",)
    extractor = getattr(model, "local_facial_extractor", None)
    if extractor is not None and len(extractor.layers):
        first = extractor.layers[0][0]
        inner = first.heads * first.dim_head
        # The face resampler's perceiver layers: [attention, feed-forward (norm, up, GELU, down)] pairs.
        prefix = "local_facial_extractor.layers.*"
        linears.update({
            f"{prefix}.0.to_q": "colwise", f"{prefix}.0.to_kv": Packed("colwise", (inner, inner)),
            f"{prefix}.0.to_out": "rowwise", f"{prefix}.1.1": "colwise", f"{prefix}.1.3": "rowwise",
        })
        attrs[f"{prefix}.0"] = ("heads",)
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
