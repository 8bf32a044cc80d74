"""JoyImage Edit Plus (`JoyImageEditPlusTransformer3DModel`): a tiny seeded model and its case."""
import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

CASES = [ModelCase("joyimage_edit_plus", "JoyImageEditPlusTransformer3DModel",
                   notes="padded patches or a padded prompt: Ulysses lays the mask out, Ring refuses it")]

REAL_CONFIGS = {
    # diffusers' defaults for the class (the released model's shape).
    "JoyImage Edit Plus": ("JoyImageEditPlusTransformer3DModel", dict(
        patch_size=[1, 2, 2], in_channels=16, hidden_size=3072, num_attention_heads=24, text_dim=4096,
        mlp_width_ratio=4.0, num_layers=20, rope_dim_list=[16, 56, 56])),
}


@builder("joyimage_edit_plus")
def _joyimage_edit_plus(heads=2, head_dim=16, layers=2):
    from diffusers import JoyImageEditPlusTransformer3DModel

    model = construct(
        JoyImageEditPlusTransformer3DModel,
        patch_size=[1, 2, 2], in_channels=4, hidden_size=heads * head_dim, num_attention_heads=heads, text_dim=24,
        mlp_width_ratio=2.0, num_layers=layers, rope_dim_list=[4, 6, 6],
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("modulate_table"):
                p.copy_(torch.randn(p.shape) * 0.1)

    def inputs(seq=16, text=8, batch=1, seed=1, reference=0, padded=0):
        # `seq` patches per sample: a target image of seq - reference patches (a 1 x n grid) and a reference image
        # of `reference`; `padded` of them (at the end) are padding, which needs the key mask.
        g = torch.Generator().manual_seed(seed)
        real = seq - padded
        shapes = [(1, 1, real - reference)] + ([(1, 1, reference)] if reference else [])
        out = dict(
            hidden_states=torch.randn(batch, seq, 4, 1, 2, 2, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
            shape_list=[shapes] * batch,
            return_dict=False,
        )
        if padded:
            out["encoder_hidden_states_mask"] = torch.ones(batch, text)
        return out

    return model, inputs
