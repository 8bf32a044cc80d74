"""CLIP text encoders (Flux, SD3, SDXL, HunyuanVideo ...): transformers ships no TP plan, so here is one.

Each encoder layer: self-attention (q, k, v by heads; out_proj by rows) and the MLP (fc1 by columns, fc2 by
rows). CLIP's attention reshapes with -1 heads; `num_heads` is set per rank so the module describes itself
truthfully. Token and position embeddings, layer norms and the text projection stay whole, so the pooled
output (taken at the EOS token) and `text_embeds` are the full ones on every rank.
"""
from __future__ import annotations

from torch import nn

from diffpar.families.text_encoders.base import COLWISE, ROWWISE, AttentionLayout, TextEncoderFamily, register_text_encoder_family

# Relative to a CLIPEncoder (`encoder` of CLIPTextModel; `text_model.encoder` of CLIPTextModelWithProjection).
CLIP_ENCODER_PLAN = {
    "layers.*.self_attn.q_proj": COLWISE,
    "layers.*.self_attn.k_proj": COLWISE,
    "layers.*.self_attn.v_proj": COLWISE,
    "layers.*.self_attn.out_proj": ROWWISE,
    "layers.*.mlp.fc1": COLWISE,
    "layers.*.mlp.fc2": ROWWISE,
}

CLIP_TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


class CLIPTextFamily(TextEncoderFamily):
    name = "CLIP text"
    classes = CLIP_TEXT_CLASSES

    def matches(self, module: nn.Module) -> bool:
        return (type(module).__name__ in CLIP_TEXT_CLASSES
                and getattr(getattr(module, "config", None), "model_type", None) == "clip_text_model")

    def targets(self, module: nn.Module):
        return [(name, CLIP_ENCODER_PLAN) for name, m in module.named_modules() if type(m).__name__ == "CLIPEncoder"]

    def attention_layout(self, parent: nn.Module):
        if type(parent).__name__ != "CLIPAttention":
            return None
        return AttentionLayout(q="q_proj", k="k_proj", v="v_proj", o="out_proj", head_dim=parent.head_dim,
                               local_attrs=lambda shard: {"num_heads": shard.num_q})

    def describe(self, module: nn.Module) -> dict:
        c = module.config
        return {"heads": c.num_attention_heads, "hidden": c.hidden_size, "layers": c.num_hidden_layers}


register_text_encoder_family(CLIPTextFamily())
