"""Tiny Bria FIBO 2 (`BriaFibo2Transformer2DModel`): noise refiner, Perceiver gist tokens, main layers with one
text-injection layer; optionally an image to edit."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


@builder("bria_fibo2")
def _bria_fibo2(heads=2, head_dim=16, layers=2, refiner_layers=1):
    from diffusers import BriaFibo2Transformer2DModel

    model = construct(
        BriaFibo2Transformer2DModel,
        in_channels=4, patch_size=2, dim=heads * head_dim, n_layers=layers, n_refiner_layers=refiner_layers,
        n_heads=heads, cap_feat_dim=32, injection_layer_ids=(layers - 1,), perceiver_num_layers=1,
        min_num_gist_tokens=4, max_num_gist_tokens=8, gist_step=4, gist_min_text_len=4, gist_max_text_len=16,
        axes_dims=(4, 6, 6), axes_lens=(64, 32, 32),
    )

    def inputs(seq=16, text=8, batch=1, seed=1, edit=False, text_padding=0):
        # The latent is 1 x seq patches (2 x 2 pixels each): seq image tokens. edit=True adds an image to edit (its
        # tokens join the image's in the refiner and main layers, as clean tokens); text_padding pads the last
        # sample's prompt (the Perceiver's text mask and a gist padding mask in the main layers).
        g = torch.Generator().manual_seed(seed)
        kwargs = dict(
            hidden_states=torch.randn(batch, 4, 2, 2 * seq, generator=g),
            timestep=torch.full((batch,), 0.5),
            encoder_hidden_states=torch.randn(batch, 2, text, 32, generator=g),
            return_dict=False,
        )
        if edit:
            kwargs["context_latents"] = [torch.randn(batch, 4, 2, 2 * seq, generator=g)]
        if text_padding:
            mask = torch.ones(batch, text, dtype=torch.bool)
            mask[-1, text - text_padding:] = False
            kwargs["encoder_attention_mask"] = mask
        return kwargs

    return model, inputs


CASES = [
    ModelCase("bria_fibo2", "BriaFibo2Transformer2DModel", input_kwargs={"edit": True},
              notes="Z-Image-like stacks split where they start; Perceiver and text cross-attention run locally"),
]

REAL_CONFIGS = {
    "Bria FIBO 2": ("BriaFibo2Transformer2DModel", dict(
        in_channels=32, patch_size=2, dim=3584, n_layers=44, n_refiner_layers=2, n_heads=28, cap_feat_dim=7680,
        injection_layer_ids=(6, 14, 22, 30, 38), perceiver_num_layers=2)),
}
