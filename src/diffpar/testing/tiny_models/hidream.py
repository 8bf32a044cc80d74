"""HiDream-I1 (`HiDreamImageTransformer2DModel`): a tiny seeded model (double- and single-stream blocks with the
mixture-of-experts MLP, T5 + per-block Llama text streams) and its case."""
import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

CASES = [
    ModelCase("hidream", "HiDreamImageTransformer2DModel",
              notes="MoE experts: every expert sliced across TP ranks (router replicated)"),
]

REAL_CONFIGS = {
    "HiDream-I1-Full": ("HiDreamImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32, attention_head_dim=128,
        num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(64, 32, 32), max_resolution=(128, 128),
        llama_layers=list(range(48)))),
}


@builder("hidream")
def _hidream(heads=2, head_dim=8, layers=1, single_layers=1, experts=4):
    from diffusers import HiDreamImageTransformer2DModel

    model = construct(
        HiDreamImageTransformer2DModel,
        patch_size=2, in_channels=4, out_channels=4, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, caption_channels=[12, 8], text_emb_dim=16,
        num_routed_experts=experts, num_activated_experts=2, axes_dims_rope=(head_dim // 2, head_dim // 4,
                                                                               head_dim // 4),
        max_resolution=(32, 32), llama_layers=list(range(layers + single_layers)),
    )

    def inputs(seq=16, text=8, batch=1, seed=1, padded=2):
        # Already patchified (what the pipeline passes for non-square latents): a 1 x seq grid of 2x2 patches,
        # with its mask (the last `padded` tokens marked as padding: the model zeroes their keys), position ids
        # and size. The T5 and Llama prompts both `text` tokens long.
        g = torch.Generator().manual_seed(seed)
        ids = torch.zeros(batch, seq, 3)
        ids[..., 2] = torch.arange(seq, dtype=torch.float32)
        return dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            timesteps=torch.full((batch,), 500.0),
            encoder_hidden_states_t5=torch.randn(batch, text, 12, generator=g),
            encoder_hidden_states_llama3=torch.randn(layers + single_layers, batch, text, 8, generator=g),
            pooled_embeds=torch.randn(batch, 16, generator=g),
            img_ids=ids,
            img_sizes=[(1, seq)] * batch,
            hidden_states_masks=(torch.arange(seq) < seq - padded).float().expand(batch, seq).clone(),
            return_dict=False,
        )

    return model, inputs
