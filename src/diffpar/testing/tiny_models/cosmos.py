"""Tiny Cosmos transformer (Predict 1/2 shape; optional per-frame timesteps and 2.5 image context)."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("cosmos")
def _cosmos(heads=2, head_dim=12, layers=2, image_context=False):
    from diffusers import CosmosTransformer3DModel

    model = construct(
        CosmosTransformer3DModel,
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 32, 128), patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False,  # the padding-mask resize needs torchvision
        extra_pos_embed_type="learnable",
        **({"img_context_dim_in": 12, "img_context_num_tokens": 3, "img_context_dim_out": heads * head_dim} if image_context else {}),
    )
    with torch.no_grad():  # learnable positions are created as zeros: seeded values so the split of them matters
        for p in model.learnable_pos_embed.parameters():
            p.copy_(torch.randn(p.shape))

    def inputs(seq=16, text=8, batch=1, seed=1, per_frame_timestep=False):
        # One latent frame of 2 x 2*seq pixels: seq video tokens with 1x2x2 patches. `per_frame_timestep`: a
        # timestep per latent frame (B, 1, T, 1, 1), as Cosmos 2 video-to-world passes it (per-token modulation).
        g = torch.Generator().manual_seed(seed)
        timestep = torch.full((batch, 1, 1, 1, 1), 0.5) if per_frame_timestep else torch.full((batch,), 0.5)
        prompt = torch.randn(batch, text, 16, generator=g)
        if image_context:
            prompt = (prompt, torch.randn(batch, 3, 12, generator=g))
        return dict(
            hidden_states=torch.randn(batch, 4, 1, 2, 2 * seq, generator=g),
            timestep=timestep,
            encoder_hidden_states=prompt,
            fps=24,
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("cosmos", "CosmosTransformer3DModel", kind="video", model_kwargs={"heads": 4},
              pipelines=("CosmosTextToWorldPipeline", "Cosmos2VideoToWorldPipeline"),
              notes="RoPE and learnable positions split as they leave their modules; cross-attention local"),
]

REAL_CONFIGS = {
    "Cosmos-1.0-Diffusion-7B": ("CosmosTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=32, attention_head_dim=128, num_layers=28,
        mlp_ratio=4.0, text_embed_dim=1024, adaln_lora_dim=256, max_size=(128, 240, 240), patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True, extra_pos_embed_type="learnable")),
}
