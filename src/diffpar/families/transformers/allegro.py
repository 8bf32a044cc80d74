"""Allegro (`AllegroTransformer3DModel`): context- and tensor-parallel plans; diffusers ships none.

Blocks: self-attention over the video tokens (3-D RoPE), cross-attention to the prompt, feed-forward. The plan
splits the video tokens where they enter the first block and gathers after `proj_out`. The prompt stays whole:
the cross-attention keeps its processor (queries from the video shard, keys and mask from the whole prompt: local).

Forward change, undone on detach: `AllegroAttnProcessor2_0` calls `F.scaled_dot_product_attention` directly, so
each self-attention gets `AllegroContextParallelAttnProcessor` (attention through diffusers' dispatcher). The RoPE
argument is ((cos, sin) tables per axis, (t, h, w) positions per token): only the positions follow the tokens, and
they sit one tuple deeper than diffusers' split hooks reach, so the processor takes this rank's positions itself,
cut exactly as the tokens were (even or uneven split of this call).

Not supported: a video padding mask on the self-attention (`attention_mask` of the latents; the pipeline passes
none): one that masks nothing is dropped, a real one is refused.
"""
from __future__ import annotations

import torch

from diffpar.compat.diffusers_cp import dispatch_attention
from diffpar.compat.diffusers_cp_hooks import shard
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.first_block_split import blocks_split_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


class AllegroContextParallelAttnProcessor:
    """Allegro's self-attention (RoPE by per-token positions) through the dispatcher."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb_allegro

        if encoder_hidden_states is not None:
            raise UnsupportedError("Allegro: the context-parallel processor is for self-attention only.")
        if attention_mask is not None:
            if bool((attention_mask == 0).all()):
                attention_mask = None  # an additive mask of zeros masks nothing
            else:
                raise UnsupportedError(
                    "Allegro with context parallelism: a video padding mask (attention_mask over the latent frames) "
                    "reached the self-attention; its keys are split across ranks, and diffpar does not lay out such a "
                    "mask. Pass attention_mask=None (the pipeline does)."
                )
        batch = hidden_states.shape[0]

        def heads(x):  # (B, S, H * D) -> (B, H, S, D)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), \
            heads(attn.to_v(hidden_states))
        if image_rotary_emb is not None:
            tables, positions = image_rotary_emb
            positions = self._local_positions(positions, hidden_states.shape[1])
            query = apply_rotary_emb_allegro(query, tables, positions)
            key = apply_rotary_emb_allegro(key, tables, positions)
        out = dispatch_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                 backend=self._attention_backend, parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))

    def _local_positions(self, positions, tokens: int):
        if self._parallel_config is None or positions[0].shape[-1] == tokens:
            return positions
        cp = self._parallel_config.context_parallel_config
        local = tuple(shard(p, p.dim() - 1, cp) for p in positions)
        if local[0].shape[-1] != tokens:
            raise UnsupportedError(
                f"Allegro: the RoPE positions cover {positions[0].shape[-1]} tokens but this rank holds {tokens} of "
                "the video: pass image_rotary_emb for the whole video being denoised."
            )
        return local


def prepare_allegro(model, config, handle, name: str) -> None:
    from diffusers.models.attention_processor import AllegroAttnProcessor2_0

    self_attention = tuple(f"transformer_blocks.{i}.attn1" for i in range(len(model.transformer_blocks)))
    replace_attention_processors(model, {AllegroAttnProcessor2_0: AllegroContextParallelAttnProcessor}, handle,
                                 name, type(model).__name__, within=self_attention)


@register_cp_plan("AllegroTransformer3DModel", prepare=prepare_allegro)
def allegro_cp_plan(model) -> dict:
    return blocks_split_plan(model, gather_after="proj_out")


@register_tp_plan("AllegroTransformer3DModel")
def _allegro_tp(model) -> TensorParallelPlan:
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise", "attn2.to_out.0": "rowwise",
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",
    }
    linears = present(model, block, "transformer_blocks")
    linears.update({
        "adaln_single.linear": GATHER,  # the six modulation vectors of every block
        # Caption projection (4096 -> width -> width): an MLP, split like the feed-forward.
        "caption_projection.linear_1": "colwise", "caption_projection.linear_2": "rowwise",
    })
    return TensorParallelPlan(linears=linears, attention_attrs={
        "transformer_blocks.*.attn1": ATTN_ATTRS, "transformer_blocks.*.attn2": ATTN_ATTRS,
    })
