"""HunyuanImage 2.1 (`HunyuanImageTransformer2DModel`): a tiny seeded model and its case."""
import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

CASES = [
    ModelCase("hunyuan_image", "HunyuanImageTransformer2DModel",
              notes="padded prompts: cut to their real tokens before the split"),
]

REAL_CONFIGS = {
    "HunyuanImage-2.1": ("HunyuanImageTransformer2DModel", dict(
        in_channels=64, out_channels=64, num_attention_heads=28, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=(1, 1), qk_norm="rms_norm",
        guidance_embeds=False, text_embed_dim=3584, text_embed_2_dim=1472, rope_theta=256.0,
        rope_axes_dim=(64, 64))),
}


@builder("hunyuan_image")
def _hunyuan_image(heads=2, head_dim=16, layers=1, single_layers=1, refiner_layers=1, byt5=False):
    from diffusers import HunyuanImageTransformer2DModel

    model = construct(
        HunyuanImageTransformer2DModel,
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=refiner_layers, patch_size=(1, 1), text_embed_dim=32,
        text_embed_2_dim=24 if byt5 else None, rope_axes_dim=(head_dim // 2, head_dim // 2),
    )

    def inputs(seq=16, text=8, batch=1, seed=1, valid=None, text_2=4, valid_2=None):
        # Image tokens = H * W with H = 1 (patch 1): W = seq. `valid`: each row's real text tokens (right-padded
        # as the tokenizer pads); with ByT5, `text_2` glyph tokens, `valid_2` of them real.
        g = torch.Generator().manual_seed(seed)

        def mask(length, counts):
            m = torch.zeros(batch, length, dtype=torch.long)
            for row, n in enumerate(counts or [length] * batch):
                m[row, :n] = 1
            return m

        out = dict(
            hidden_states=torch.randn(batch, 4, 1, seq, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            encoder_attention_mask=mask(text, valid),
            return_dict=False,
        )
        if byt5:
            out["encoder_hidden_states_2"] = torch.randn(batch, text_2, 24, generator=g)
            out["encoder_attention_mask_2"] = mask(text_2, valid_2)
        return out

    return model, inputs
