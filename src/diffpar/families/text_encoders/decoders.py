"""Decoder LLMs used as text encoders, sharded by transformers' own `base_model_tp_plan`.

Llama (HunyuanVideo, HiDream; LlavaForConditionalGeneration's language model: HunyuanVideo image-to-video),
Gemma 1/2 (Lumina, Sana), Gemma 3 (LTX-2), Mistral and Ministral 3 (the text part of
Mistral3ForConditionalGeneration: Flux.2), Qwen3 (Z-Image, Flux.2 Klein), Qwen2.5-VL and Qwen3-VL (the language
models of their ...ForConditionalGeneration: QwenImage, QwenImage 2.1 and others; vision towers stay whole), GLM and
GLM-4 (CogView4), SmolLM3 (Bria FIBO), T5Gemma's encoder (PRX, Motif-Video).

An encoder is recognized by the class of its decoder stack and the `model_type` of that stack's config,
wherever the stack sits inside the module the pipeline holds (`LlamaModel` itself, `Qwen3ForCausalLM.model`,
`Mistral3ForConditionalGeneration.model.language_model` ...). The plan comes from the stack's config:
q/k/v and gate/up colwise, o and down rowwise. Decoder attention reshapes with -1 heads, so only
`num_key_value_groups` (read by both eager and sdpa attention) must become per-rank; `num_heads` /
`num_key_value_heads` are set too where a class keeps them. The LM head and token embeddings stay whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from diffpar.errors import UnsupportedError
from diffpar.families.text_encoders.base import AttentionLayout, TextEncoderFamily, register_text_encoder_family, transformers_plan


@dataclass(frozen=True)
class DecoderSpec:
    family: str
    stack_class: str
    attention_class: str
    # MLP class -> {layer: parts}: layers whose output the MLP's forward chunks into equal parts.
    packed: dict = field(default_factory=dict)
    # Our plan for a stack whose config's base_model_tp_plan leaves its layers out (Qwen3-VL's names only the
    # embeddings); None: the config's plan.
    plan: dict | None = None


# q/k/v and gate/up colwise, o and down rowwise: the plan transformers gives Llama-style decoders.
LLAMA_STYLE_PLAN = {
    "layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
    "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise",
    "layers.*.mlp.gate_proj": "colwise", "layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "rowwise",
}


# config.model_type of the decoder stack -> what diffpar has verified for it.
DECODER_SPECS = {
    "llama": DecoderSpec("Llama", "LlamaModel", "LlamaAttention"),
    "gemma": DecoderSpec("Gemma", "GemmaModel", "GemmaAttention"),
    "gemma2": DecoderSpec("Gemma 2", "Gemma2Model", "Gemma2Attention"),
    "gemma3_text": DecoderSpec("Gemma 3", "Gemma3TextModel", "Gemma3Attention"),
    "mistral": DecoderSpec("Mistral", "MistralModel", "MistralAttention"),
    "ministral3": DecoderSpec("Ministral 3", "Ministral3Model", "Ministral3Attention"),
    "qwen3": DecoderSpec("Qwen3", "Qwen3Model", "Qwen3Attention"),
    "qwen2_5_vl_text": DecoderSpec("Qwen2.5-VL (language model)", "Qwen2_5_VLTextModel", "Qwen2_5_VLAttention"),
    # GLM's MLP runs one fused gate_up_proj and chunks it in two (gate, up).
    "glm": DecoderSpec("GLM", "GlmModel", "GlmAttention", packed={"GlmMLP": {"gate_up_proj": 2}}),
    "glm4": DecoderSpec("GLM-4", "Glm4Model", "Glm4Attention", packed={"Glm4MLP": {"gate_up_proj": 2}}),
    # The language model of Qwen3VLForConditionalGeneration (QwenImage 2.1, Krea 2, JoyImage, ERNIE-Image...):
    # Qwen3's per-head q/k norms and interleaved MRoPE; its vision tower stays whole.
    "qwen3_vl_text": DecoderSpec("Qwen3-VL (language model)", "Qwen3VLTextModel", "Qwen3VLTextAttention",
                                 plan=LLAMA_STYLE_PLAN),
    "smollm3": DecoderSpec("SmolLM3", "SmolLM3Model", "SmolLM3Attention"),  # Bria FIBO
    # T5Gemma's encoder stack (PRX, Motif-Video): bidirectional Gemma 2 layers.
    "t5_gemma_module": DecoderSpec("T5Gemma (encoder)", "T5GemmaEncoder", "T5GemmaSelfAttention"),
}

# Wrappers whose text part is one of the stacks above (for the supported table; any wrapper works).
WRAPPERS = (
    "Gemma3ForConditionalGeneration", "Mistral3ForConditionalGeneration", "Qwen3ForCausalLM",
    "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel", "Qwen3VLForConditionalGeneration", "Qwen3VLModel",
    "T5GemmaEncoderModel", "LlavaForConditionalGeneration",
)


def _plan_carrying_stacks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Submodules holding a `layers` list whose config carries a transformers TP plan."""
    found = []
    for name, m in module.named_modules():
        config = getattr(m, "config", None)
        if getattr(config, "base_model_tp_plan", None) and isinstance(getattr(m, "layers", None), nn.ModuleList):
            found.append((name, m))
    return found


def _spec(stack: nn.Module) -> DecoderSpec | None:
    spec = DECODER_SPECS.get(getattr(stack.config, "model_type", None))
    return spec if spec is not None and type(stack).__name__ == spec.stack_class else None


def _decoder_local_attrs(parent: nn.Module):
    optional = [a for a in ("num_heads", "num_key_value_heads") if isinstance(getattr(parent, a, None), int)]

    def local(shard):
        values = {"num_key_value_groups": shard.kv_groups}
        if "num_heads" in optional:
            values["num_heads"] = shard.num_q
        if "num_key_value_heads" in optional:
            values["num_key_value_heads"] = shard.num_kv
        return values

    return local


class DecoderFamily(TextEncoderFamily):
    name = "decoder LLMs (transformers' base_model_tp_plan)"
    classes = tuple(s.stack_class for s in DECODER_SPECS.values()) + WRAPPERS

    def matches(self, module: nn.Module) -> bool:
        # Any transformers model with a plan-carrying stack is ours to accept or to refuse with a clear reason.
        return bool(_plan_carrying_stacks(module))

    def check_module(self, module: nn.Module) -> None:
        for name, stack in _plan_carrying_stacks(module):
            if _spec(stack) is None:
                supported = ", ".join(f"{s.family} ({s.stack_class})" for s in DECODER_SPECS.values())
                raise UnsupportedError(
                    f"{type(module).__name__}: its text stack {type(stack).__name__} (model_type "
                    f"{getattr(stack.config, 'model_type', None)!r}) carries a transformers TP plan, but diffpar has not "
                    f"verified that family. Supported decoder families: {supported}. Remove it from "
                    "extra_parallel_modules (it then runs whole on every rank)."
                )

    def targets(self, module: nn.Module):
        return [(name, dict(_spec(stack).plan) if _spec(stack).plan else transformers_plan(stack.config))
                for name, stack in _plan_carrying_stacks(module)]

    def attention_layout(self, parent: nn.Module):
        names = {s.attention_class for s in DECODER_SPECS.values()}
        if type(parent).__name__ not in names:
            return None
        return AttentionLayout(q="q_proj", k="k_proj", v="v_proj", o="o_proj", head_dim=parent.head_dim,
                               local_attrs=_decoder_local_attrs(parent))

    def packed_parts(self, parent: nn.Module, child: str) -> int:
        for spec in DECODER_SPECS.values():
            parts = spec.packed.get(type(parent).__name__, {}).get(child)
            if parts:
                return parts
        return 1

    def describe(self, module: nn.Module) -> dict:
        out = {}
        for name, stack in _plan_carrying_stacks(module):
            c = stack.config
            out[name or "(self)"] = {
                "model_type": c.model_type, "layers": len(stack.layers), "heads": c.num_attention_heads,
                "kv_heads": getattr(c, "num_key_value_heads", None),
            }
        return {"stacks": out}


register_text_encoder_family(DecoderFamily())
