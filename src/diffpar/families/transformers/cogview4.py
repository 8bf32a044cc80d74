"""CogView4 (`CogView4Transformer2DModel`): context- and tensor-parallel plans; diffusers ships none.

CP plan: `patch_embed` returns (image tokens, text tokens), both split there; the RoPE pair (cos, sin) over the
image tokens (made by `rope`, or given by the caller) is split at every block, where it arrives. Blocks work on
[text shard, image shard] per rank: attention has no mask in the pipeline's calls, RoPE travels with the image
tokens, and the feed-forward is per token. Gather after `proj_out`. Attention goes through diffusers' dispatcher
(`ContextParallelCogView4AttnProcessor`; a real text mask is refused under context parallelism).

TP plan: attention by heads, the MLP by width, each block's text/image AdaLN-Zero modulation (12 x dim) and the
output modulation gathered.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import prepare_generic_attention
from diffpar.families.transformers.cogview3plus import cogview_tp_plan
from diffpar.families.transformers.tp_plans import register_tp_plan


@register_cp_plan("CogView4Transformer2DModel", prepare=prepare_generic_attention)
def cogview4_cp_plan(model) -> dict:
    streams = split_input(split_dim=1, expected_dims=3, split_output=True)
    rope_half = split_input(split_dim=0, expected_dims=2)
    return {
        "patch_embed": {0: streams, 1: streams},
        "transformer_blocks.*": {"image_rotary_emb": [rope_half, rope_half]},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


# The same blocks as CogView3-Plus' (attention, MLP, one AdaLN modulation per block): the same TP plan.
register_tp_plan("CogView4Transformer2DModel")(cogview_tp_plan)
