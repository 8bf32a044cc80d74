"""Ideogram 4 (`Ideogram4Transformer2DModel`): a tiny seeded model and its case."""
import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

CASES = [ModelCase("ideogram4", "Ideogram4Transformer2DModel",
                   notes="padded prompts (segment mask): Ulysses only; Ring refuses them")]

REAL_CONFIGS = {
    # diffusers' defaults for the class (the released model's shape).
    "Ideogram 4": ("Ideogram4Transformer2DModel", dict(
        in_channels=128, num_layers=34, attention_head_dim=256, num_attention_heads=18, intermediate_size=12288,
        adaln_dim=512, llm_features_dim=53248, rope_theta=5_000_000, mrope_section=(24, 20, 20))),
}


@builder("ideogram4")
def _ideogram4(heads=2, head_dim=16, layers=2):
    from diffusers import Ideogram4Transformer2DModel

    model = construct(
        Ideogram4Transformer2DModel,
        in_channels=16, num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
        intermediate_size=64, adaln_dim=16, llm_features_dim=40, mrope_section=(4, 2, 2),
    )

    def inputs(seq=16, text=8, batch=1, seed=1, padding=0):
        # The pipeline's packed layout: [padding][text][image] per row; image tokens on a 1 x seq grid. `padding`
        # of the `text` leading positions are padding (their own segment).
        text += text % 2  # one joined sequence: an even prompt keeps its length as odd as `seq`
        g = torch.Generator().manual_seed(seed)
        total = text + seq
        real_text = text - padding
        positions = torch.zeros(batch, total, 3, dtype=torch.long)
        positions[:, padding:text] = torch.arange(real_text)[:, None]
        positions[:, text:, 2] = torch.arange(seq) + 65536
        positions[:, text:, 0] = 65536
        positions[:, text:, 1] = 65536
        segments = torch.full((batch, total), -1, dtype=torch.long)
        segments[:, padding:] = 1
        indicator = torch.zeros(batch, total, dtype=torch.long)
        indicator[:, padding:text] = 3
        indicator[:, text:] = 2
        return dict(
            hidden_states=torch.randn(batch, total, 16, generator=g),
            timestep=torch.full((batch,), 0.5),
            encoder_hidden_states=torch.randn(batch, total, 40, generator=g),
            position_ids=positions,
            segment_ids=segments,
            indicator=indicator,
            return_dict=False,
        )

    return model, inputs
