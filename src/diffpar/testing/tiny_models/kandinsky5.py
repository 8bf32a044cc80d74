"""Tiny Kandinsky 5 transformer: prompt encoder blocks, then visual blocks with self- and cross-attention."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("kandinsky5")
def _kandinsky5(heads=2, head_dim=16, text_layers=1, layers=2):
    from diffusers import Kandinsky5Transformer3DModel

    axes = (head_dim // 4 // 2 * 2, (head_dim - head_dim // 4 // 2 * 2) // 2 // 2 * 2)
    axes = (*axes, head_dim - sum(axes))
    model = construct(
        Kandinsky5Transformer3DModel,
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=heads * head_dim, ff_dim=2 * heads * head_dim, num_text_blocks=text_layers,
        num_visual_blocks=layers, axes_dims=axes,
    )
    with torch.no_grad():  # modulation layers start at zero (loaded from the checkpoint): seeded values
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.copy_(torch.randn(p.shape) * 0.2)

    def inputs(seq=16, text=8, batch=1, seed=1):
        # One latent frame of 2 x 2*seq pixels, channels last: seq video tokens with 1x2x2 patches.
        g = torch.Generator().manual_seed(seed)
        return dict(
            hidden_states=torch.randn(batch, 1, 2, 2 * seq, 4, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            timestep=torch.full((batch,), 500.0),
            pooled_projections=torch.randn(batch, 8, generator=g),
            visual_rope_pos=(torch.arange(1), torch.arange(1), torch.arange(seq)),
            text_rope_pos=torch.arange(text),
            return_dict=True,  # with False the model returns a bare tensor; the harness reads `.sample`
        )

    return model, inputs


CASES = [
    ModelCase("kandinsky5", "Kandinsky5Transformer3DModel", kind="video", pipelines=("Kandinsky5T2VPipeline",),
              notes="prompt blocks and cross-attention local (whole prompt on every rank); nabla attention refused"),
]

REAL_CONFIGS = {
    "Kandinsky-5.0-T2V-Lite": ("Kandinsky5Transformer3DModel", dict(
        in_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=512, out_visual_dim=16, patch_size=(1, 2, 2),
        model_dim=1792, ff_dim=7168, num_text_blocks=2, num_visual_blocks=32, axes_dims=(16, 24, 24),
        visual_cond=True)),
}
