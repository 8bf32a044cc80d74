"""Context- and tensor-parallel plans for OmniGen (`OmniGenTransformer2DModel`); diffusers ships neither.

OmniGen is a decoder-only transformer over one sequence [prompt tokens (with input images' patches in place),
time token, output image patches], with a query-by-key mask (causal over the prompt, bidirectional inside each
image) and one RoPE table over the sequence.

Plan: the sequence is split as it enters the first layer, the RoPE table (cos, sin: positions, dim) as it leaves
`rope`; the sequence is gathered after the final `norm` (the forward then keeps the last image tokens by count,
which needs the whole sequence). Each rank holds one contiguous piece, so after Ulysses' all-to-all every rank
has all queries and keys of its heads in the original order: the whole (L x L) mask applies as it is (diffpar's
Ulysses mask shim passes a whole-length mask through). Ring attention cannot apply a query-by-key mask: OmniGen's
causal prompt mask is refused under the ring by diffpar's ring shim (use ulysses_size); a call without a mask
runs in every mode.

Forward change (undone on detach): OmniGen's processor calls SDPA directly, so each layer's attention gets
`OmniGenContextParallelAttnProcessor` (the same projections and RoPE, attention through diffusers' dispatcher).

Tensor parallel: q/k/v by heads (GQA k/v by their own heads; `out_dim`, which the processor reshapes by, is
divided too), the output by rows, the fused gate-up MLP packed by
its two halves and the down projection by rows; the time embeddings stay whole.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp import dispatch_attention
from diffpar.compat.diffusers_cp_hooks import split_input
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import blocks_split_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


class OmniGenContextParallelAttnProcessor:
    """OmniGen's self-attention (with its RoPE and optional additive mask) through `dispatch_attention_fn`."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = query.shape[-1] // attn.heads
        kv_heads = key.shape[-1] // head_dim
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, kv_heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, kv_heads, head_dim).transpose(1, 2)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real_unbind_dim=-2)
            key = apply_rotary_emb(key, image_rotary_emb, use_real_unbind_dim=-2)
        if kv_heads != attn.heads:
            key = key.repeat_interleave(attn.heads // kv_heads, dim=1)
            value = value.repeat_interleave(attn.heads // kv_heads, dim=1)
        if attention_mask is not None and not bool((attention_mask == 0).all()):
            mask = attention_mask
        else:
            mask = None  # an additive mask of zeros masks nothing
        if mask is None:
            out = dispatch_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                     backend=self._attention_backend, parallel_config=self._parallel_config)
        else:
            out = dispatch_attention_fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                        attn_mask=mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[0](out)


def prepare_omnigen(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_omnigen import OmniGenAttnProcessor2_0

    replace_attention_processors(model, {OmniGenAttnProcessor2_0: OmniGenContextParallelAttnProcessor}, handle,
                                 name, type(model).__name__)


@register_cp_plan("OmniGenTransformer2DModel", prepare=prepare_omnigen)
def omnigen_cp_plan(model) -> dict:
    rope = split_input(split_dim=0, expected_dims=2, split_output=True)
    return blocks_split_plan(model, "layers", gather_after="norm", what="layers", tables={"rope": {0: rope, 1: rope}})


@register_tp_plan("OmniGenTransformer2DModel")
def omnigen_tp_plan(model) -> TensorParallelPlan:
    if not len(model.layers):
        return TensorParallelPlan(linears={})
    inner = model.layers[0].mlp.down_proj.in_features
    block = {
        "self_attn.to_q": "colwise", "self_attn.to_k": "colwise", "self_attn.to_v": "colwise",
        "self_attn.to_out.0": "rowwise",
        "mlp.gate_up_proj": Packed("colwise", (inner, inner)), "mlp.down_proj": "rowwise",
    }
    # The token table (98.5M of 3.8B parameters), the output modulation and the time MLPs' second layers: split by
    # width, outputs gathered (whole on every rank they kept 0.518 / 0.278 of the weights per rank at tp 2 / 4).
    whole_outputs = {name: GATHER for name in ("embed_tokens", "norm_out.linear", "time_token.linear_2",
                                               "t_embedder.linear_2") if _has(model, name)}
    return TensorParallelPlan(linears={**present(model, block, "layers"), **whole_outputs},
                              attention_attrs={"layers.*.self_attn": (*ATTN_ATTRS, "out_dim")})


def _has(model, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
