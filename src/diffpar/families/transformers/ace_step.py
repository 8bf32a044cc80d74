"""ACE-Step 1.5 (`AceStepTransformer1DModel`): context- and tensor-parallel plans; diffusers ships neither.

The sequence is 1-D: the latent frames (source latents and chunk masks concatenated on channels), padded to the
patch size and patchified 2:1 (25 latent frames a second: 12.5 tokens a second, a 4-minute song is 3000 tokens).
Self-attention alternates between a sliding window (layers 0, 2, ...: keys within `sliding_window` = 128 tokens
either side, a band mask the forward builds over the whole sequence) and full attention; both use grouped-query
heads and RoPE (one (cos, sin) table the forward builds for the whole sequence and gives every layer).

CP plan: split the tokens as they enter the first layer, gather after the last one (the final AdaLN, the
transposed-convolution unpatchify and the crop to the original length then run on the whole sequence). While
parallel, each layer's attention gets a processor of ours (undone on detach), which takes this rank's rows of the
RoPE table (`compat.diffusers_cp_group.shard_rows`) and:
- full attention: through diffusers' dispatcher with the parallel config (Ulysses, Ring, both), key/value heads
  repeated to the query heads first (exact; the ring's LSE path takes no grouped-query flag);
- sliding-window attention: a band no Ulysses or Ring kernel in diffusers can mask, so the keys and values of every
  rank are all-gathered over the context-parallel group (as much traffic as the ring's own gather) and this rank's
  query rows attend locally under their rows of the band. Exact on every layout;
- cross-attention to the condition sequence (whole on every rank): locally (`ltx.local_attention_processors`).

TP plan: both attentions by heads (query and key/value heads divided alike), the SwiGLU MLP by width, the two
timestep embeddings' AdaLN expansions (`time_proj`, 6 x dim) gathered.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpar.compat.diffusers_cp import dispatch_attention, gather_uneven
from diffpar.compat.diffusers_cp_group import shard_rows, token_shards
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import blocks_split_plan
from diffpar.families.transformers.ltx import local_attention_processors
from diffpar.families.transformers.tp_plans import TensorParallelPlan, register_tp_plan

_LABEL = "AceStepTransformer1DModel"


def _rotate(x: torch.Tensor, rope) -> torch.Tensor:
    """ACE-Step's RoPE (rotate-half, Qwen3 layout) on (B, S, H, D), as diffusers' `apply_rotary_emb` does it."""
    cos, sin = (t[None, :, None, :] for t in rope)
    first, second = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-second, first), dim=-1) * sin).to(x.dtype)


class AceStepContextParallelSelfAttnProcessor:
    """diffusers' `AceStepAttnProcessor2_0` for self-attention over a token shard (see the module docstring)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        local = hidden_states.shape[1]
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, attn.head_dim)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.kv_heads, attn.head_dim)))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.kv_heads, attn.head_dim))
        if image_rotary_emb is not None:
            rope = tuple(shard_rows(t, local, self._parallel_config, _LABEL) for t in image_rotary_emb)
            query, key = _rotate(query, rope), _rotate(key, rope)
        if attn.kv_heads != attn.heads:
            repeat = attn.heads // attn.kv_heads
            key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
        if getattr(attn, "sliding_window", None) is None:
            if attention_mask is not None:
                raise UnsupportedError(
                    f"{_LABEL}: a full-attention layer received an attention mask under context parallelism; the "
                    "forward never builds one there. Call the model as its pipeline does."
                )
            out = dispatch_attention(query, key, value, backend=self._attention_backend,
                                     parallel_config=self._parallel_config)
        else:
            out = self._sliding(attn, query, key, value)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))

    def _sliding(self, attn, query, key, value):
        shards = token_shards(self._parallel_config)
        key = gather_uneven(key, 1, shards.group)  # every rank's keys, in token order
        value = gather_uneven(value, 1, shards.group)
        total, local = key.shape[1], query.shape[1]
        rows = shard_rows(torch.arange(total, device=query.device), local, self._parallel_config, _LABEL)
        columns = torch.arange(total, device=query.device)
        band = (rows[:, None] - columns[None, :]).abs() <= attn.sliding_window  # the forward's mask, these rows
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=band, scale=attn.scaling)
        return out.transpose(1, 2)


def prepare_ace_step(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.ace_step_transformer import AceStepAttnProcessor2_0

    from diffpar.families.transformers.attention_processors import replace_attention_processors

    local_attention_processors(model, ("layers.*.cross_attn",), (AceStepAttnProcessor2_0,), handle, name)
    replace_attention_processors(model, {AceStepAttnProcessor2_0: AceStepContextParallelSelfAttnProcessor},
                                 handle, name, _LABEL,
                                 within=tuple(f"layers.{i}.self_attn" for i in range(len(model.layers))))


@register_cp_plan("AceStepTransformer1DModel", prepare=prepare_ace_step)
def ace_step_cp_plan(model) -> dict:
    return blocks_split_plan(model, "layers", what="layers")


@register_tp_plan("AceStepTransformer1DModel")
def ace_step_tp_plan(model) -> TensorParallelPlan:
    block = {"mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise"}
    for a in ("self_attn", "cross_attn"):
        block.update({f"{a}.to_q": "colwise", f"{a}.to_k": "colwise", f"{a}.to_v": "colwise",
                      f"{a}.to_out.0": "rowwise"})
    linears = {f"layers.*.{suffix}": style for suffix, style in block.items()}
    linears["time_embed.time_proj"] = GATHER
    linears["time_embed_r.time_proj"] = GATHER
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={f"layers.*.{a}": ("heads", "kv_heads") for a in ("self_attn", "cross_attn")},
    )
