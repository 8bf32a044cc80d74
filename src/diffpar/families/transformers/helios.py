"""Helios (`HeliosTransformer3DModel`): diffusers' context-parallel plan, built for the model's real depth (it
replaces diffusers' own), and the tensor-parallel plan.

diffusers' plan splits the tokens at the input of every block's self-attention (with the RoPE rows), its
cross-attention and its MLP, and gathers each one's output; everything between (norms, per-token modulation, the
history / current split of the guidance cross-attention) runs on the whole sequence. Its gathers are listed block
by block for `blocks.0` .. `blocks.39`, so a model of any other depth fails inside diffusers ("'2' is not a
submodule of 'ModuleList'" with fewer blocks; blocks past 40 would run whole). Ours is the same plan for
`len(model.blocks)`. The cross-attention's processor already keeps the prompt whole and local (it passes no
parallel config when it has encoder states).

Refused: `is_amplify_history=True`, whose self-attention scales the keys of the history tokens it finds by their
position in the whole sequence (the first `tokens - current tokens`), which a split moves.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.tp_plans import register_tp_plan
from diffpar.families.transformers.wan import _wan as wan_tp_plan


@register_cp_plan("HeliosTransformer3DModel", overrides_native=True)
def helios_cp_plan(model) -> dict:
    if getattr(model.config, "is_amplify_history", False):
        raise UnsupportedError(
            f"{type(model).__name__} with is_amplify_history=True: its self-attention scales the keys of the history "
            "tokens, found by their position in the whole sequence, which a context-parallel split moves. Use a "
            "checkpoint without history amplification, or tp_size (tensor parallelism) for this model."
        )
    tokens = split_input(split_dim=1, expected_dims=3)
    plan = {
        "blocks.*.attn1": {"hidden_states": tokens, "rotary_emb": tokens},
        "blocks.*.attn2": {"hidden_states": tokens},
        "blocks.*.ffn": {"hidden_states": tokens},
    }
    for i in range(len(model.blocks)):
        for part in ("attn1", "attn2", "ffn"):
            plan[f"blocks.{i}.{part}"] = gather_output(gather_dim=1, expected_dims=3)
    return plan


# The blocks are Wan's (self- and cross-attention with RMSNorms across heads, the same MLP and modulation).
register_tp_plan("HeliosTransformer3DModel")(wan_tp_plan)
