"""T5 and UMT5 encoders (Flux, SD3, LTX, Chroma: T5; Wan: UMT5): transformers ships no TP plan, so here is one.

Each block: self-attention (q, k, v by heads; o by rows; layer 0 of T5 and every layer of UMT5 also hold the
relative-position bias table `Embedding(buckets, n_heads)`, sliced to this rank's heads), then the feed-forward
(`wi`, or gated `wi_0`/`wi_1`, by columns; `wo` by rows). The attention reads `n_heads` and `inner_dim` at
forward time (UMT5 reshapes with `n_heads`; both build a zero bias of `n_heads` heads when they hold no table),
so those become per-rank values. Embeddings and layer norms stay whole.
"""
from __future__ import annotations

from torch import nn

from diffpar.families.text_encoders.base import (
    COLWISE,
    HEAD_TABLE,
    ROWWISE,
    AttentionLayout,
    TextEncoderFamily,
    register_text_encoder_family,
)

# Relative to a T5Stack / UMT5Stack (`encoder` of the encoder model). `wi` (relu) or `wi_0`/`wi_1` (gated-gelu):
# a pattern that matches no layer is simply unused.
T5_STACK_PLAN = {
    "block.*.layer.0.SelfAttention.q": COLWISE,
    "block.*.layer.0.SelfAttention.k": COLWISE,
    "block.*.layer.0.SelfAttention.v": COLWISE,
    "block.*.layer.0.SelfAttention.o": ROWWISE,
    "block.*.layer.0.SelfAttention.relative_attention_bias": HEAD_TABLE,
    "block.*.layer.1.DenseReluDense.wi": COLWISE,
    "block.*.layer.1.DenseReluDense.wi_0": COLWISE,
    "block.*.layer.1.DenseReluDense.wi_1": COLWISE,
    "block.*.layer.1.DenseReluDense.wo": ROWWISE,
}

# encoder class -> (config model_type, stack class, attention class)
T5_ENCODERS = {
    "T5EncoderModel": ("t5", "T5Stack", "T5Attention"),
    "UMT5EncoderModel": ("umt5", "UMT5Stack", "UMT5Attention"),
}


def _t5_local_attrs(head_dim: int):
    def local(shard):
        return {"n_heads": shard.num_q, "inner_dim": shard.num_q * head_dim}

    return local


class T5Family(TextEncoderFamily):
    name = "T5 / UMT5 encoder"
    classes = tuple(T5_ENCODERS)

    def matches(self, module: nn.Module) -> bool:
        spec = T5_ENCODERS.get(type(module).__name__)
        return spec is not None and getattr(getattr(module, "config", None), "model_type", None) == spec[0]

    def targets(self, module: nn.Module):
        stack_class = T5_ENCODERS[type(module).__name__][1]
        return [(name, T5_STACK_PLAN) for name, m in module.named_modules() if type(m).__name__ == stack_class]

    def attention_layout(self, parent: nn.Module):
        if type(parent).__name__ not in {spec[2] for spec in T5_ENCODERS.values()}:
            return None
        d = parent.key_value_proj_dim
        return AttentionLayout(q="q", k="k", v="v", o="o", head_dim=d, local_attrs=_t5_local_attrs(d),
                               head_table="relative_attention_bias")

    def describe(self, module: nn.Module) -> dict:
        c = module.config
        return {"heads": c.num_heads, "d_kv": c.d_kv, "d_ff": c.d_ff, "layers": c.num_layers,
                "feed_forward": c.feed_forward_proj}


register_text_encoder_family(T5Family())
