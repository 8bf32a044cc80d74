"""JoyImage Edit (`JoyImageEditTransformer3DModel`): a tiny seeded model and its case."""
import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

CASES = [ModelCase("joyimage", "JoyImageEditTransformer3DModel")]

REAL_CONFIGS = {
    # diffusers' defaults for the class (the released model's shape).
    "JoyImage Edit": ("JoyImageEditTransformer3DModel", dict(
        patch_size=[1, 2, 2], in_channels=16, hidden_size=3072, num_attention_heads=24, text_dim=4096,
        mlp_width_ratio=4.0, num_layers=20, rope_dim_list=[16, 56, 56])),
}


@builder("joyimage")
def _joyimage(heads=2, head_dim=16, layers=2, rope_type="rope"):
    from diffusers import JoyImageEditTransformer3DModel

    model = construct(
        JoyImageEditTransformer3DModel,
        patch_size=[1, 2, 2], in_channels=4, hidden_size=heads * head_dim, num_attention_heads=heads, text_dim=24,
        mlp_width_ratio=2.0, num_layers=layers, rope_dim_list=[4, 6, 6], rope_type=rope_type,
    )
    # The modulation tables start at zero in diffusers: seed them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulate_table"):
                p.copy_(torch.randn(p.shape) * 0.1)

    def inputs(seq=16, text=8, batch=1, seed=1):
        # Image tokens = T * (H/2) * (W/2) with T = 1, H = 2: W = 2 * seq.
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 1, 2, 2 * seq, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
            return_dict=False,
        )

    return model, inputs
