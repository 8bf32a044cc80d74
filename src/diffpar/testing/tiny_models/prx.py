"""PRX (`PRXTransformer2DModel`): a tiny seeded model and its case."""
import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

CASES = [ModelCase("prx", "PRXTransformer2DModel")]

REAL_CONFIGS = {
    # diffusers' defaults for the class (the released model's shape).
    "PRX": ("PRXTransformer2DModel", dict(
        in_channels=16, patch_size=2, context_in_dim=2304, hidden_size=1792, mlp_ratio=3.5, num_heads=28, depth=16,
        axes_dim=[32, 32])),
}


@builder("prx")
def _prx(heads=2, head_dim=16, layers=2):
    from diffusers import PRXTransformer2DModel

    model = construct(
        PRXTransformer2DModel,
        in_channels=4, patch_size=2, context_in_dim=24, hidden_size=heads * head_dim, mlp_ratio=2.0, num_heads=heads,
        depth=layers, axes_dim=[head_dim // 2, head_dim // 2],
    )
    # The modulation starts at zero in diffusers (every block would be the identity): seed it.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation.lin" in name:
                p.copy_(torch.randn(p.shape) * 0.1)

    def inputs(seq=16, text=8, batch=1, seed=1, valid=None):
        # Image tokens = (H/2) * (W/2) with H = 2: W = 2 * seq. `valid`: real prompt tokens per row.
        g = torch.Generator().manual_seed(seed)
        out = dict(
            hidden_states=torch.randn(batch, 4, 2, 2 * seq, generator=g),
            timestep=torch.full((batch,), 0.5),
            encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
            return_dict=False,
        )
        if valid is not None:
            out["attention_mask"] = torch.arange(text)[None] < torch.tensor(valid)[:, None]
        return out

    return model, inputs
