"""Hunyuan-DiT (`HunyuanDiT2DModel`): tiny seeded builder, harness case, real configuration."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_models.pixart import grid
from diffpar.testing.tiny_transformers import builder, construct

CLIP_TOKENS, T5_TOKENS = 6, 8  # the model's fixed prompt lengths (it learns a padding embedding per position)


@builder("hunyuan_dit")
def _hunyuan_dit(heads=2, head_dim=16, layers=4):
    from diffusers import HunyuanDiT2DModel

    model = construct(
        HunyuanDiT2DModel,
        sample_size=8, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, hidden_size=heads * head_dim, cross_attention_dim=16, cross_attention_dim_t5=16,
        pooled_projection_dim=8, text_len=CLIP_TOKENS, text_len_t5=T5_TOKENS, activation_fn="gelu-approximate",
        use_style_cond_and_image_meta_size=False,  # as v1.2 (its size embedding would outweigh tiny blocks)
    )

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=2):
        # seq image tokens (2 x 2 patches, rows x cols grid) and the pipeline's RoPE pair for that grid. The prompt
        # lengths are the model's (`text` is unused); the last `text_padding` tokens of each prompt are padding.
        from diffusers.models.embeddings import get_2d_rotary_pos_embed
        from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

        g = torch.Generator().manual_seed(seed)
        rows, cols = grid(seq)

        def mask(tokens):
            m = torch.ones(batch, tokens, dtype=torch.long)
            m[:, tokens - text_padding:] = 0
            return m

        crops = get_resize_crop_region_for_grid((rows, cols), 4)
        return dict(
            hidden_states=torch.randn(batch, 4, 2 * rows, 2 * cols, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, CLIP_TOKENS, 16, generator=g),
            text_embedding_mask=mask(CLIP_TOKENS),
            encoder_hidden_states_t5=torch.randn(batch, T5_TOKENS, 16, generator=g),
            text_embedding_mask_t5=mask(T5_TOKENS),
            image_rotary_emb=get_2d_rotary_pos_embed(head_dim, crops, (rows, cols), output_type="pt"),
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("hunyuan_dit", "HunyuanDiT2DModel",
              notes="RoPE pair split with the tokens; long skips on shards; cross-attention local"),
]

REAL_CONFIGS = {
    "HunyuanDiT-v1.2": ("HunyuanDiT2DModel", dict(
        num_attention_heads=16, attention_head_dim=88, in_channels=4, patch_size=2, activation_fn="gelu-approximate",
        sample_size=128, hidden_size=1408, num_layers=40, mlp_ratio=4.3637, learn_sigma=True,
        cross_attention_dim=1024, norm_type="layer_norm", cross_attention_dim_t5=2048, pooled_projection_dim=1024,
        text_len=77, text_len_t5=256, use_style_cond_and_image_meta_size=False)),
}
