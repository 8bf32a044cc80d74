"""ERNIE-Image (`ErnieImageTransformer2DModel`): a tiny seeded model and its case."""
import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

CASES = [ModelCase("ernie_image", "ErnieImageTransformer2DModel")]

REAL_CONFIGS = {
    # diffusers' defaults for the class (the released model's shape).
    "ERNIE-Image": ("ErnieImageTransformer2DModel", dict(
        hidden_size=3072, num_attention_heads=24, num_layers=24, ffn_hidden_size=8192, in_channels=128,
        out_channels=128, patch_size=1, text_in_dim=2560, rope_theta=256, rope_axes_dim=(32, 48, 48))),
}


@builder("ernie_image")
def _ernie_image(heads=2, head_dim=16, layers=2):
    from diffusers import ErnieImageTransformer2DModel

    axes = (4, 6, 6) if head_dim == 16 else (head_dim // 4, head_dim // 4, head_dim - 2 * (head_dim // 4))
    model = construct(
        ErnieImageTransformer2DModel,
        hidden_size=heads * head_dim, num_attention_heads=heads, num_layers=layers, ffn_hidden_size=64,
        in_channels=4, out_channels=4, patch_size=1, text_in_dim=24, rope_axes_dim=axes,
    )
    # The modulation and output layers start at zero in diffusers (the whole model would output zeros): seed them.
    with torch.no_grad():
        for p in (*model.adaLN_modulation.parameters(), *model.final_linear.parameters()):
            p.copy_(torch.randn(p.shape) * 0.1)

    def inputs(seq=16, text=8, batch=1, seed=1, text_lens=None):
        # Image tokens = H * W with patch 1 and H = 1: W = seq. `text_lens`: each row's real prompt tokens.
        text += text % 2  # one joined sequence: an even prompt keeps its length as odd as `seq`
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 1, seq, generator=g),
            timestep=torch.full((batch,), 500.0),
            text_bth=torch.randn(batch, text, 24, generator=g),
            text_lens=torch.tensor(text_lens or [text] * batch),
            return_dict=False,
        )

    return model, inputs
