"""Context- and tensor-parallel plans for HiDream-I1 (`HiDreamImageTransformer2DModel`); diffusers ships neither.

Context parallel. The image tokens are split as they leave `x_embedder`, every text stream as it leaves its
`caption_projection` (the T5 tokens and each block's Llama layer); blocks then work on [image shard, text shards]
(the forward concatenates and trims the streams by lengths it reads from the shards, so it stays consistent);
the output is gathered after `final_layer`. Joint attention has no attention mask, so the order of keys across
ranks does not matter.

Two things the forward builds for the whole sequence are cut inside attention by
`HiDreamContextParallelAttnProcessor` (the processor also goes through diffusers' dispatcher, which HiDream's own
processor, calling SDPA directly, does not):
- the RoPE table, built on [all image ids, all text ids]: this rank's image rows are cut exactly as the tokens
  were; text ids are all zero, so every text row is the same and the first ones serve for this rank's text;
- `hidden_states_masks` (non-square latents are padded to the model's maximum and padded keys zeroed): its image
  part is cut like the tokens, its text part (single-stream blocks) is all ones.
The full image token count comes from `x_embedder`'s input. All forward changes are undone on detach.

Tensor parallel: heads by q/k/v columns (both streams) with the q/k RMSNorms taken over all heads (sharded norms),
outputs by rows; every SwiGLU MLP, each routed expert and the shared expert included, by its hidden width (all
ranks hold every expert, each a slice of it, so the router's choice is the same everywhere and needs no exchange);
AdaLN modulation and the per-block caption projections gathered.
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp import dispatch_attention
from diffpar.compat.diffusers_cp_hooks import gather_output, shard, split_input
from diffpar.engines.tp_shard import GATHER
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan

_STACKS = ("double_stream_blocks", "single_stream_blocks")


def _processor_class(kept: dict):
    """Built lazily (the rope helper comes from the installed diffusers). `kept["image_tokens"]`: this call's
    whole image token count."""
    from diffusers.models.transformers.transformer_hidream_image import apply_rope

    class HiDreamContextParallelAttnProcessor:
        _attention_backend = None
        _parallel_config = None

        def __call__(self, attn, hidden_states, hidden_states_masks=None, encoder_hidden_states=None,
                     image_rotary_emb=None, *args, **kwargs):
            dtype = hidden_states.dtype
            batch = hidden_states.shape[0]
            cp = self._parallel_config.context_parallel_config if self._parallel_config is not None else None
            image_total = kept.get("image_tokens")

            def heads(x):  # (B, S, H * D) -> (B, S, H, D)
                return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads)

            query = heads(attn.q_rms_norm(attn.to_q(hidden_states)).to(dtype=dtype))
            key = heads(attn.k_rms_norm(attn.to_k(hidden_states)).to(dtype=dtype))
            value = heads(attn.to_v(hidden_states))
            local = hidden_states.shape[1]
            if hidden_states_masks is not None:
                mask = hidden_states_masks
                if cp is not None and image_total is not None:
                    # [image part cut like the tokens, text part (ones) as long as this rank's text].
                    image_part = shard(mask[:, :image_total], 1, cp)
                    mask = torch.cat([image_part, mask[:, image_total:]], dim=1)[:, :local]
                key = key * mask.view(batch, -1, 1, 1)

            image_tokens = local
            if not attn.single:
                query_t = heads(attn.q_rms_norm_t(attn.to_q_t(encoder_hidden_states)).to(dtype=dtype))
                key_t = heads(attn.k_rms_norm_t(attn.to_k_t(encoder_hidden_states)).to(dtype=dtype))
                value_t = heads(attn.to_v_t(encoder_hidden_states))
                query = torch.cat([query, query_t], dim=1)
                key = torch.cat([key, key_t], dim=1)
                value = torch.cat([value, value_t], dim=1)

            rope = image_rotary_emb
            if cp is not None and image_total is not None:
                rope = torch.cat([shard(rope[:, :image_total], 1, cp), rope[:, image_total:]], dim=1)
            rope = rope[:, :query.shape[1]]
            if query.shape[-1] == rope.shape[-3] * 2:
                query, key = apply_rope(query, key, rope)
            else:
                q1, q2 = query.chunk(2, dim=-1)
                k1, k2 = key.chunk(2, dim=-1)
                q1, k1 = apply_rope(q1, k1, rope)
                query, key = torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)

            out = dispatch_attention(query, key, value, backend=self._attention_backend,
                                     parallel_config=self._parallel_config)
            out = out.flatten(2, 3).to(query.dtype)
            if attn.single:
                return attn.to_out(out)
            return attn.to_out(out[:, :image_tokens]), attn.to_out_t(out[:, image_tokens:])

    return HiDreamContextParallelAttnProcessor


def prepare_hidream(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_hidream_image import HiDreamAttnProcessor

    kept: dict = {}
    replace_attention_processors(model, {HiDreamAttnProcessor: _processor_class(kept)}, handle, name,
                                 type(model).__name__)
    removers = []
    handle.add(f"{name}: record the image token count", lambda: [r.remove() for r in removers])

    def record(module, args):
        kept["image_tokens"] = args[0].shape[1]  # x_embedder takes the patchified latent, all tokens

    removers.append(model.x_embedder.register_forward_pre_hook(record))


@register_cp_plan("HiDreamImageTransformer2DModel", prepare=prepare_hidream)
def hidream_cp_plan(model) -> dict:
    tokens = {0: split_input(split_dim=1, expected_dims=3, split_output=True)}
    return {
        "x_embedder": tokens,
        "caption_projection.*": tokens,
        "final_layer": gather_output(gather_dim=1, expected_dims=3),
    }


def _swiglu(prefix: str) -> dict:
    return {f"{prefix}.w1": "colwise", f"{prefix}.w3": "colwise", f"{prefix}.w2": "rowwise"}


@register_tp_plan("HiDreamImageTransformer2DModel")
def hidream_tp_plan(model) -> TensorParallelPlan:
    linears, attrs, norms = {}, {}, []
    for stack in _STACKS:
        blocks = getattr(model, stack)
        if not len(blocks):
            continue
        inner = blocks[0].block
        attention = {"attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise",
                     "attn1.to_out": "rowwise", "attn1.to_q_t": "colwise", "attn1.to_k_t": "colwise",
                     "attn1.to_v_t": "colwise", "attn1.to_out_t": "rowwise", "adaLN_modulation.1": GATHER}
        mlp = {}
        ff = inner.ff_i
        if hasattr(ff, "experts"):
            mlp.update(_swiglu("ff_i.shared_experts"))
            for index in range(len(ff.experts)):
                mlp.update(_swiglu(f"ff_i.experts.{index}"))
        else:
            mlp.update(_swiglu("ff_i"))
        if getattr(inner, "ff_t", None) is not None:
            mlp.update(_swiglu("ff_t"))
        linears.update(present(model, {f"block.{k}": v for k, v in {**attention, **mlp}.items()}, stack))
        attrs[f"{stack}.*.block.attn1"] = ATTN_ATTRS
        norm_names = ["attn1.q_rms_norm", "attn1.k_rms_norm", "attn1.q_rms_norm_t", "attn1.k_rms_norm_t"]
        norms += list(present(model, {f"block.{n}": None for n in norm_names}, stack))
    linears["final_layer.adaLN_modulation.1"] = GATHER
    # One text projection per block (4096 -> 2560 each: 3% of HiDream-I1's weights): sliced, output gathered.
    linears["caption_projection.*.linear"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs=attrs, sharded_norms=tuple(norms))
