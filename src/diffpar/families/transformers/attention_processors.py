"""Context-parallel versions of diffusers' generic attention processors (those that call
`F.scaled_dot_product_attention` directly, so no parallel config can reach them).

Each does what the original does, with one difference: attention over the split tokens (self-attention, or joint
[text, image] attention) goes through diffusers' dispatcher with the parallel config (Ulysses all-to-all, Ring KV
exchange), while cross-attention to a prompt every rank holds whole runs locally, exactly as the original (the
query shard attends to every key; no communication is needed). Linear attention (Sana) is the exception: its
key-value summary is a sum over tokens, so one all-reduce of the per-shard sums replaces the dispatcher.

`generic_cp_processors()` maps each original class (of the installed release) to its version here.
`check_generic_attention(model, label)` is the plan-time check: the options these processors cannot split exactly
(a GroupNorm or spatial norm taken over the whole sequence) raise `UnsupportedError` before anything changes. `prepare_generic_attention` is the `prepare=` step of a plan whose
model uses only these processors (it swaps them through `replace_attention_processors`, undone on detach).

Pieces the family processors share: `replace_attention_processors` (the checked, undoable swap), `joint_qkv` (the
joint [text | image] projections of MMDiT blocks), `heads_first` / `grouped_heads` / `repeat_kv_heads` (head
layouts), `attend_heads_first` and `attend_split` (attention locally or through the dispatcher).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks, dispatch_attention
from diffpar.compat.diffusers_cp_group import token_shards
from diffpar.errors import UnsupportedError


def _mask_that_masks(mask: torch.Tensor | None, label: str) -> torch.Tensor | None:
    """A self-attention mask under context parallelism: one that masks nothing is dropped (every rank holds the
    same whole mask, so every rank decides the same); a real one is refused (keys are sharded, the mask is not)."""
    if mask is None:
        return None
    keeps_all = bool(mask.all()) if mask.dtype == torch.bool else bool((mask == 0).all())
    if keeps_all:
        return None
    raise UnsupportedError(
        f"{label}: a self-attention mask over the split tokens reached attention under context parallelism; "
        "diffpar cannot lay it out over sharded keys. Call the model without `attention_mask` (the pipelines "
        "never pass one for self-attention), or run it without ulysses_size / ring_size."
    )


def heads_first(attn, query, key, value, batch_size: int):
    """(B, S, H * D) projections -> (B, H, S, D), the diffusers processors' layout up to attention, with the
    per-head norms."""
    head_dim = key.shape[-1] // attn.heads

    def heads(x):
        return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

    query, key, value = heads(query), heads(key), heads(value)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def attend_heads_first(processor, attn, query, key, value, attention_mask, sequence_length: int, batch_size: int,
                       *, local: bool, refuse_mask) -> torch.Tensor:
    """Attention over (B, H, S, D) tensors, returned as (B, S, H, D). `local` (cross-attention to keys every rank
    holds, or no parallel config): as the diffusers original, with its mask prepared the original's way. Otherwise
    through the dispatcher with the processor's parallel config, after `refuse_mask(attention_mask)` has dropped or
    refused the mask (keys are sharded, a mask is not)."""
    if local:
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False).transpose(1, 2)
    refuse_mask(attention_mask)
    return dispatch_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              backend=processor._attention_backend, parallel_config=processor._parallel_config)


def grouped_heads(attn, query, key, value, batch_size: int):
    """(B, S, H * D) projections -> (B, S, H, D) queries and (B, S, KV, D) keys and values: with grouped-query
    attention the key width tells the key/value heads."""
    head_dim = query.shape[-1] // attn.heads
    kv_heads = key.shape[-1] // head_dim
    return (query.view(batch_size, -1, attn.heads, head_dim), key.view(batch_size, -1, kv_heads, head_dim),
            value.view(batch_size, -1, kv_heads, head_dim))


def repeat_kv_heads(key, value, heads: int):
    """(B, S, KV, D) keys and values with each head repeated to the `heads` query heads, as the grouped-query
    originals do before attention (so Ulysses splits all three by the same heads)."""
    repeats = heads // key.shape[2]
    if repeats <= 1:
        return key, value
    return key.repeat_interleave(repeats, dim=2), value.repeat_interleave(repeats, dim=2)


def attend_split(processor, query, key, value, mask: torch.Tensor | None, label: str, scale: float | None = None):
    """Attention over (B, S, H, D) tensors whose queries and keys are this rank's token shard, through diffusers'
    dispatcher with the processor's parallel config, and with a key-padding mask over the WHOLE sequence (B, 1, 1,
    N) in its original order: after Ulysses' all-to-all every rank attends over the whole sequence in that order,
    so the whole mask is the right one. A mask that masks nothing is dropped (exact, and the ring cannot take
    one); a real one on a release whose context-parallel attention takes no mask (0.36) is refused clearly."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    if mask is not None and bool(mask.all()):
        mask = None
    if mask is not None and not context_parallel_attention_takes_masks():
        raise UnsupportedError(
            f"{label}: the samples in this batch differ in length, which needs a padding mask, and this diffusers "
            "release's context-parallel attention takes none (0.37+ does). Run samples of different lengths in "
            "separate calls, or upgrade diffusers."
        )
    return dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=scale,
                                 backend=processor._attention_backend, parallel_config=processor._parallel_config)


def joint_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, heads, *,
              text_first: bool, dim: int = 1, rotate=None):
    """The joint-attention projections of an MMDiT-style block: image queries/keys/values (`to_q/k/v`, per-head
    `norm_q/k`), then, with a prompt, the text ones (`add_q/k/v_proj`, `norm_added_q/k`) concatenated on `dim`,
    text first or image first as the original lays out its sequence. `heads` reshapes a (B, S, H * D) projection
    into the processor's layout; `rotate(query, key)`, if given, applies RoPE to the image part alone, before the
    concatenation. Without a prompt, the image part alone."""
    def project(x, to_q, to_k, to_v, norm_q, norm_k):
        query, key, value = heads(to_q(x)), heads(to_k(x)), heads(to_v(x))
        return (query if norm_q is None else norm_q(query)), (key if norm_k is None else norm_k(key)), value

    query, key, value = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
    if rotate is not None:
        query, key = rotate(query, key)
    if encoder_hidden_states is None:
        return query, key, value
    text_query, text_key, text_value = project(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj,
                                               attn.add_v_proj, attn.norm_added_q, attn.norm_added_k)

    def joined(image, text):
        return torch.cat([text, image] if text_first else [image, text], dim=dim)

    return joined(query, text_query), joined(key, text_key), joined(value, text_value)


def replace_attention_processors(model, replacements: dict[type, type], handle, name: str, model_label: str,
                                 within: tuple[str, ...] = ("",)) -> None:
    """Give every attention (under the `within` module-name prefixes) whose processor is exactly one of
    `replacements` a new one; undo restores the original objects.

    Checks every processor before changing any: another processor type (IP-Adapter, PAG, fused projections, ...)
    has no context-parallel version here, and running it on a shard would compute attention over the shard only.
    """
    targets, unknown = [], set()
    for module_name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        if processor is None or not module_name.startswith(within):
            continue
        if type(processor) in replacements:
            targets.append((module, processor))
        elif not hasattr(processor, "_parallel_config") and type(processor) not in replacements.values():
            unknown.add(f"{module_name}: {type(processor).__name__}")
    if unknown:
        raise UnsupportedError(
            f"{model_label}: these attention processors have no context-parallel version in diffpar: "
            f"{sorted(unknown)}. Context parallelism supports the model's default processors "
            f"({sorted(t.__name__ for t in replacements)}). Remove what installed them (e.g. unload_ip_adapter(), "
            "unfuse_qkv_projections()) before enable_cache."
        )

    def restore():
        for module, old in targets:
            module.processor = old

    handle.add(f"{name}: context-parallel attention processors", restore)
    for module, old in targets:
        new = replacements[type(old)]()
        vars(new).update(vars(old))  # keep per-instance settings, e.g. an attention backend the user chose
        module.processor = new


class ContextParallelAttnProcessor2_0:
    """diffusers' `AttnProcessor2_0`: self-attention through the dispatcher with the parallel config,
    cross-attention (an `encoder_hidden_states` is given) locally."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        return self._attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def _rotate(self, attn, query, key, image_rotary_emb):
        """RoPE on (B, H, S, D) queries and keys; none here."""
        return query, key

    def _heads(self, attn, query, key, value, batch_size):
        return heads_first(attn, query, key, value, batch_size)

    def _refuse_self_attention_mask(self, mask: torch.Tensor | None) -> None:
        _mask_that_masks(mask, type(self).__name__)

    def _attention(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb=None):
        residual = hidden_states
        if attn.spatial_norm is not None:  # refused at plan time; kept so the call stays the original's
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if cross else hidden_states).shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if not cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = self._heads(attn, query, key, value, batch_size)
        query, key = self._rotate(attn, query, key, image_rotary_emb)

        out = attend_heads_first(self, attn, query, key, value, attention_mask, sequence_length, batch_size,
                                 local=cross or self._parallel_config is None,
                                 refuse_mask=self._refuse_self_attention_mask)
        hidden_states = out.flatten(2, 3).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class ContextParallelHunyuanAttnProcessor(ContextParallelAttnProcessor2_0):
    """diffusers' `HunyuanAttnProcessor2_0`: `AttnProcessor2_0` plus RoPE on queries (and on keys in
    self-attention); the RoPE table must hold this rank's query tokens (the plan splits it with them)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 image_rotary_emb=None):
        return self._attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb)

    def _rotate(self, attn, query, key, image_rotary_emb):
        from diffusers.models.embeddings import apply_rotary_emb

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            if not attn.is_cross_attention:
                key = apply_rotary_emb(key, image_rotary_emb)
        return query, key


class ContextParallelLumina2AttnProcessor:
    """diffusers' `Lumina2AttnProcessor2_0` (RMS-normed q/k, complex RoPE, grouped key/value heads, key-padding
    mask) with attention through the dispatcher and the parallel config. Key/value heads are repeated to the query
    heads first, as the original does, so Ulysses splits every tensor by the same heads."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None,
                 base_sequence_length: int | None = None) -> torch.Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        if base_sequence_length is not None and self._parallel_config is not None:
            raise UnsupportedError(
                "ContextParallelLumina2AttnProcessor: `base_sequence_length` scales attention by the log of the "
                "whole sequence length, which a token shard does not know. Call attention without it, or run "
                "without ulysses_size / ring_size."
            )
        batch_size, sequence_length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        dtype = query.dtype
        query, key, value = grouped_heads(attn, query, key, value, batch_size)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, use_real=False)
            key = apply_rotary_emb(key, image_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        scale = attn.scale
        if base_sequence_length is not None:
            import math

            scale = math.sqrt(math.log(sequence_length, base_sequence_length)) * attn.scale
        key, value = repeat_kv_heads(key, value, attn.heads)
        mask = None if attention_mask is None else attention_mask.bool().view(batch_size, 1, 1, -1)
        if self._parallel_config is None:
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                 attn_mask=mask, scale=scale).transpose(1, 2)
        else:
            out = attend_split(self, query, key, value, mask, type(self).__name__, scale=scale)
        hidden_states = out.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class ContextParallelLuminaAttnProcessor:
    """diffusers' `LuminaAttnProcessor2_0` (norms across heads, complex RoPE, grouped key/value heads, a mask, the
    "proportional attention" scale): self-attention (`attn.is_cross_attention` False: the block passes the same
    tokens as `encoder_hidden_states`) through the dispatcher with the parallel config, cross-attention to the
    whole prompt locally. The proportional scale needs the whole sequence length: the self-attention mask covers
    the whole sequence on every rank, so its length is that length. Returns (B, S, H, D), as the original."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, query_rotary_emb: torch.Tensor | None = None,
                 key_rotary_emb: torch.Tensor | None = None, base_sequence_length: int | None = None) -> torch.Tensor:
        import math

        from diffusers.models.embeddings import apply_rotary_emb

        if hidden_states.ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape
        split = self._parallel_config is not None and not attn.is_cross_attention
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        dtype = query.dtype
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key, value = grouped_heads(attn, query, key, value, batch_size)
        if query_rotary_emb is not None:
            query = apply_rotary_emb(query, query_rotary_emb, use_real=False)
        if key_rotary_emb is not None:
            key = apply_rotary_emb(key, key_rotary_emb, use_real=False)
        query, key = query.to(dtype), key.to(dtype)
        scale = None
        if key_rotary_emb is not None:
            scale = attn.scale
            if base_sequence_length is not None:
                whole = sequence_length
                if split:
                    if attention_mask is None:
                        raise UnsupportedError(
                            "ContextParallelLuminaAttnProcessor: proportional attention (`base_sequence_length`) "
                            "needs the whole sequence length, which a token shard without the whole mask cannot "
                            "tell. Pass the mask, or run without ulysses_size / ring_size."
                        )
                    whole = attention_mask.shape[-1]
                scale = math.sqrt(math.log(whole, base_sequence_length)) * attn.scale
        key, value = repeat_kv_heads(key, value, attn.heads)
        mask = None if attention_mask is None else attention_mask.bool().view(batch_size, 1, 1, -1)
        if split:
            out = attend_split(self, query, key, value, mask, type(self).__name__, scale=scale)
        else:
            if mask is not None:
                mask = mask.expand(-1, attn.heads, sequence_length, -1)
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                 attn_mask=mask, scale=scale).transpose(1, 2)
        return out.to(dtype)


class ContextParallelAuraFlowAttnProcessor:
    """diffusers' `AuraFlowAttnProcessor2_0` (MMDiT joint attention, [text, image] with per-head norms, no mask, no
    RoPE) through the dispatcher with the parallel config. Each rank holds [its text shard, its image shard]:
    attention does not depend on the order of keys, so that needs no reordering."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 *args, **kwargs):
        def heads(x):  # (B, S, H * D) -> (B, S, H, D)
            return x.unflatten(2, (attn.heads, -1))

        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, heads, text_first=True)
        text_tokens = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]

        if self._parallel_config is None:
            out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                 dropout_p=0.0, scale=attn.scale, is_causal=False).transpose(1, 2)
        else:
            out = attend_split(self, query, key, value, None, type(self).__name__, scale=attn.scale)
        hidden_states = out.flatten(2, 3).to(query.dtype)
        text_out = None
        if encoder_hidden_states is not None:
            text_out, hidden_states = hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if text_out is None:
            return hidden_states
        return hidden_states, attn.to_add_out(text_out)


class ContextParallelCogVideoXAttnProcessor:
    """diffusers' `CogVideoXAttnProcessor2_0` (joint attention over [text, image] with per-head norms, RoPE on the
    image part) through the dispatcher with the parallel config. Each rank holds [its text shard, its image shard];
    a RoPE table must hold this rank's image tokens (the plan splits it with them)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None) -> torch.Tensor:
        text_tokens = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        query, key, value = heads_first(attn, query, key, value, batch_size)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_tokens:] = apply_rotary_emb(query[:, :, text_tokens:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_tokens:] = apply_rotary_emb(key[:, :, text_tokens:], image_rotary_emb)
        out = attend_heads_first(self, attn, query, key, value, attention_mask, sequence_length, batch_size,
                                 local=self._parallel_config is None,
                                 refuse_mask=lambda mask: _mask_that_masks(mask, type(self).__name__))
        hidden_states = out.flatten(2, 3)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_tokens, hidden_states.size(1) - text_tokens], dim=1
        )
        return hidden_states, encoder_hidden_states


class ContextParallelCogView4AttnProcessor:
    """diffusers' `CogView4AttnProcessor` (joint [text, image] attention, per-head norms, RoPE on the image part)
    through the dispatcher with the parallel config. Its optional text mask (B, text tokens) is an outer product
    over the whole prompt: one that masks nothing is dropped; a real one is refused under context parallelism
    (the prompt is split, the mask is not)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        if self._parallel_config is not None and attention_mask is not None:
            if not bool((attention_mask != 0).all()):
                raise UnsupportedError(
                    "ContextParallelCogView4AttnProcessor: a text padding mask reached attention under context "
                    "parallelism, where the prompt tokens are split across ranks. Call the model without "
                    "`attention_mask` (the pipeline passes none), or run without ulysses_size / ring_size."
                )
            attention_mask = None
        dtype = encoder_hidden_states.dtype
        batch_size, text_tokens, _ = encoder_hidden_states.shape
        image_tokens = hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text_tokens:, :] = apply_rotary_emb(query[:, :, text_tokens:, :], image_rotary_emb,
                                                            use_real_unbind_dim=-2)
            key[:, :, text_tokens:, :] = apply_rotary_emb(key[:, :, text_tokens:, :], image_rotary_emb,
                                                          use_real_unbind_dim=-2)
        if self._parallel_config is None:
            if attention_mask is not None:  # the original's text mask, unchanged
                mix = torch.ones((batch_size, text_tokens + image_tokens), device=query.device)
                mix[:, :text_tokens] = attention_mask.float().to(query.device)
                mix = mix.unsqueeze(2)
                attention_mask = ((mix @ mix.transpose(1, 2)) > 0).unsqueeze(1).to(query.dtype)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False).transpose(1, 2)
        else:
            out = dispatch_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                     backend=self._attention_backend, parallel_config=self._parallel_config)
        hidden_states = out.flatten(2, 3).type_as(query)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_tokens, hidden_states.size(1) - text_tokens], dim=1
        )
        return hidden_states, encoder_hidden_states


class ContextParallelSanaLinearAttnProcessor:
    """diffusers' `SanaLinearAttnProcessor2_0` (ReLU linear attention) on a token shard, exactly.

    The output for a query is (V_pad K^T) q normalized by its last row: V_pad K^T, a (head_dim + 1) x head_dim
    matrix per head, is a sum over all key tokens. Each rank sums over its own tokens, and one all-reduce over the
    context-parallel ranks adds the shards' sums: the same matrix as one process (up to the order of the sum), at
    a cost independent of the sequence length. Cross-attention (`encoder_hidden_states` given: keys every rank
    holds whole) needs no exchange."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        import torch.distributed as dist

        original_dtype = hidden_states.dtype
        split = self._parallel_config is not None and encoder_hidden_states is None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = F.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1))).float()  # (B, H, D, S)
        key = F.relu(key.transpose(1, 2).unflatten(1, (attn.heads, -1)).transpose(2, 3)).float()  # (B, H, S, D)
        value = value.transpose(1, 2).unflatten(1, (attn.heads, -1)).float()  # (B, H, D, S)
        value = F.pad(value, (0, 0, 0, 1), mode="constant", value=1.0)  # a row of ones: the normalizer
        summary = torch.matmul(value, key)  # (B, H, D + 1, D), summed over this rank's key tokens
        if split:
            dist.all_reduce(summary, group=token_shards(self._parallel_config).group)
        hidden_states = torch.matmul(summary, query)
        hidden_states = hidden_states[:, :, :-1] / (hidden_states[:, :, -1:] + 1e-15)
        hidden_states = hidden_states.flatten(1, 2).transpose(1, 2).to(original_dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if original_dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states


class ContextParallelSanaAttnProcessor:
    """diffusers' `SanaAttnProcessor2_0` where it is cross-attention to the whole prompt: runs locally, unchanged
    (the query shard attends to every key). Self-attention over split tokens is refused (none of diffusers' models
    uses it so)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

        if encoder_hidden_states is None and self._parallel_config is not None:
            raise UnsupportedError(
                "ContextParallelSanaAttnProcessor: softmax self-attention over split tokens with Sana's processor "
                "has no context-parallel version in diffpar. Run without ulysses_size / ring_size."
            )
        return SanaAttnProcessor2_0.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask)


def generic_cp_processors() -> dict[type, type]:
    """diffusers' generic processor class -> its context-parallel version (built lazily: the keys come from the
    installed diffusers)."""
    from diffusers.models.attention_processor import (
        AttnProcessor2_0,
        AuraFlowAttnProcessor2_0,
        CogVideoXAttnProcessor2_0,
        HunyuanAttnProcessor2_0,
        LuminaAttnProcessor2_0,
    )

    processors = {AttnProcessor2_0: ContextParallelAttnProcessor2_0,
                  AuraFlowAttnProcessor2_0: ContextParallelAuraFlowAttnProcessor,
                  CogVideoXAttnProcessor2_0: ContextParallelCogVideoXAttnProcessor,
                  HunyuanAttnProcessor2_0: ContextParallelHunyuanAttnProcessor,
                  LuminaAttnProcessor2_0: ContextParallelLuminaAttnProcessor}
    try:
        from diffusers.models.transformers.transformer_lumina2 import Lumina2AttnProcessor2_0
    except ImportError:  # a release without Lumina 2
        pass
    else:
        processors[Lumina2AttnProcessor2_0] = ContextParallelLumina2AttnProcessor
    from diffusers.models.attention_processor import SanaLinearAttnProcessor2_0

    processors[SanaLinearAttnProcessor2_0] = ContextParallelSanaLinearAttnProcessor
    try:
        from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0
    except ImportError:
        pass
    else:
        processors[SanaAttnProcessor2_0] = ContextParallelSanaAttnProcessor
    try:
        from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor
    except ImportError:  # a release without CogView4
        pass
    else:
        processors[CogView4AttnProcessor] = ContextParallelCogView4AttnProcessor
    return processors


def check_generic_attention(model: torch.nn.Module, label: str) -> None:
    """Plan-time refusal of attention options the context-parallel processors cannot split exactly."""
    problems = []
    for name, module in model.named_modules():
        if not hasattr(module, "processor"):
            continue
        if getattr(module, "group_norm", None) is not None:
            problems.append(f"{name}: group_norm (statistics over the whole sequence)")
        if getattr(module, "spatial_norm", None) is not None:
            problems.append(f"{name}: spatial_norm (statistics over the whole image)")
    if problems:
        raise UnsupportedError(
            f"{label}: these attention modules normalize over all tokens before attention, which a token shard "
            f"cannot reproduce: {problems}. Run this model without ulysses_size / ring_size."
        )


def prepare_generic_attention(model, config, handle, name: str, within: tuple[str, ...] = ("",)) -> None:
    """`register_cp_plan(..., prepare=prepare_generic_attention)`: every processor with a version here (under the
    `within` module-name prefixes: attention a plan keeps whole keeps its own processor) gets it; any other
    processor there is refused before a change."""
    replace_attention_processors(model, generic_cp_processors(), handle, name, type(model).__name__, within)
