"""GLM-Image (`GlmImageTransformer2DModel`): a tiny seeded model and its case."""
import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

CASES = [ModelCase("glm_image", "GlmImageTransformer2DModel",
                   notes="padded text masks refused under CP (query-by-key mask); fewer text tokens than ranks "
                         "(guidance): cut over the joint [text, image] sequence "
                         "(tests/test_glm_image_joint_split.py)")]

REAL_CONFIGS = {
    # diffusers' defaults for the class (the released model's shape).
    "GLM-Image": ("GlmImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=16, num_layers=30, attention_head_dim=40, num_attention_heads=64,
        text_embed_dim=1472, time_embed_dim=512, condition_dim=256, prior_vq_quantizer_codebook_size=16384)),
}


@builder("glm_image")
def _glm_image(heads=2, head_dim=16, layers=2):
    from diffusers import GlmImageTransformer2DModel

    model = construct(
        GlmImageTransformer2DModel,
        patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, text_embed_dim=24, time_embed_dim=16, condition_dim=8,
        prior_vq_quantizer_codebook_size=64,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, mask=False):
        # Image tokens = (H/2) * (W/2) with H = 2: W = 2 * seq. `mask`: pass an all-ones text mask.
        g = torch.Generator().manual_seed(seed)
        out = dict(
            hidden_states=torch.randn(batch, 4, 2, 2 * seq, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
            prior_token_id=torch.randint(0, 64, (batch, seq), generator=g),
            prior_token_drop=torch.zeros(batch, seq, dtype=torch.bool),
            timestep=torch.full((batch,), 500.0),
            target_size=torch.tensor([[32.0, 32.0]] * batch),
            crop_coords=torch.zeros(batch, 2),
            return_dict=False,
        )
        if mask:
            out["attention_mask"] = torch.ones(batch, text)
        return out

    return model, inputs
