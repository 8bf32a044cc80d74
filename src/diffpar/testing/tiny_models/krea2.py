"""Krea 2 (`Krea2Transformer2DModel`): a tiny seeded model (text fusion, GQA blocks) and its case."""
import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

CASES = [ModelCase("krea2", "Krea2Transformer2DModel", notes="text fusion runs whole on every rank")]

REAL_CONFIGS = {
    # diffusers' defaults for the class (the released model's shape).
    "Krea 2": ("Krea2Transformer2DModel", dict(
        in_channels=64, num_layers=28, attention_head_dim=128, num_attention_heads=48, num_key_value_heads=12,
        intermediate_size=16384, timestep_embed_dim=256, text_hidden_dim=2560, num_text_layers=12,
        text_num_attention_heads=20, text_num_key_value_heads=20, text_intermediate_size=6912)),
}


@builder("krea2")
def _krea2(heads=2, head_dim=16, layers=2, kv_heads=None):
    from diffusers import Krea2Transformer2DModel

    model = construct(
        Krea2Transformer2DModel,
        in_channels=16, num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, intermediate_size=64, timestep_embed_dim=16, text_hidden_dim=24,
        num_text_layers=3, text_num_attention_heads=4, text_num_key_value_heads=4, text_intermediate_size=32,
        num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6),
    )
    # Every RMSNorm scale and modulation table starts at zero in diffusers: seed them so each does something.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_shift_table") or (p.dim() == 1 and "norm" in name):
                p.copy_(torch.randn(p.shape) * 0.1)

    def inputs(seq=16, text=8, batch=1, seed=1, valid=None):
        # Packed image tokens; positions: text rows zero, image rows (0, 0, i). `valid`: real text tokens per row.
        text += text % 2  # one joined sequence: an even prompt keeps its length as odd as `seq`
        g = torch.Generator().manual_seed(seed)
        positions = torch.zeros(text + seq, 3)
        positions[text:, 2] = torch.arange(seq, dtype=torch.float32)
        out = dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 3, 24, generator=g),
            timestep=torch.full((batch,), 0.5),
            position_ids=positions,
            return_dict=False,
        )
        if valid is not None:
            out["encoder_attention_mask"] = torch.arange(text)[None] < torch.tensor(valid)[:, None]
        return out

    return model, inputs
