"""BERT encoders (HunyuanDiT's `text_encoder` is a BertModel; RoBERTa and XLM-RoBERTa share the layout): transformers ships no TP plan, so here is one.

BERT splits each layer's pairs over sibling modules: the attention's query/key/value sit in `attention.self`
and its output projection in `attention.output.dense`; the MLP's first layer is `intermediate.dense` and its
second `output.dense`, both children of the layer. So layers are grouped two levels up (`group`): the attention
module (by heads) and the layer (by inner features). `BertSelfAttention` reshapes with -1 heads; its
`num_attention_heads` and `all_head_size` are set per rank so it describes itself truthfully. Embeddings, layer
norms (after the all-reduce, on the full width) and the pooler stay whole.
"""
from __future__ import annotations

from torch import nn

from diffpar.families.text_encoders.base import COLWISE, ROWWISE, AttentionLayout, TextEncoderFamily, register_text_encoder_family

# Relative to a BertEncoder (`encoder` of BertModel).
BERT_ENCODER_PLAN = {
    "layer.*.attention.self.query": COLWISE,
    "layer.*.attention.self.key": COLWISE,
    "layer.*.attention.self.value": COLWISE,
    "layer.*.attention.output.dense": ROWWISE,
    "layer.*.intermediate.dense": COLWISE,
    "layer.*.output.dense": ROWWISE,
}

# encoder class -> (config model_type, encoder-stack class, attention class holding the two sibling modules)
BERT_ENCODERS = {
    "BertModel": ("bert", "BertEncoder", "BertAttention"),
    # The same layer layout and attention attributes (transformers copies BERT's modules for them).
    "RobertaModel": ("roberta", "RobertaEncoder", "RobertaAttention"),
    "XLMRobertaModel": ("xlm-roberta", "XLMRobertaEncoder", "XLMRobertaAttention"),
}


def _bert_local_attrs(head_dim: int):
    def local(shard):
        return {"num_attention_heads": shard.num_q, "all_head_size": shard.num_q * head_dim}

    return local


class BertFamily(TextEncoderFamily):
    name = "BERT / RoBERTa encoder"
    classes = tuple(BERT_ENCODERS)

    def matches(self, module: nn.Module) -> bool:
        spec = BERT_ENCODERS.get(type(module).__name__)
        return spec is not None and getattr(getattr(module, "config", None), "model_type", None) == spec[0]

    def targets(self, module: nn.Module):
        stack_class = BERT_ENCODERS[type(module).__name__][1]
        return [(name, BERT_ENCODER_PLAN) for name, m in module.named_modules() if type(m).__name__ == stack_class]

    def group(self, path: str) -> tuple[str, str]:
        # Every planned layer is `<module>.<sibling>.<linear>`: group by `<module>` (the attention, or the layer).
        parent, sibling, linear = path.rsplit(".", 2)
        return parent, f"{sibling}.{linear}"

    def attention_layout(self, parent: nn.Module):
        if type(parent).__name__ not in {spec[2] for spec in BERT_ENCODERS.values()}:
            return None
        d = parent.self.attention_head_size
        return AttentionLayout(q="self.query", k="self.key", v="self.value", o="output.dense", head_dim=d,
                               local_attrs=_bert_local_attrs(d), attrs_path="self")

    def describe(self, module: nn.Module) -> dict:
        c = module.config
        return {"heads": c.num_attention_heads, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
                "layers": c.num_hidden_layers}


register_text_encoder_family(BertFamily())
