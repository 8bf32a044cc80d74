"""Tensor parallelism for first families that had context parallelism only (SD3, HunyuanVideo): their builders
live in `tiny_transformers` and their CP layouts run in `tests/test_transformer_cp.py`; these cases run the TP
layouts through the harness. Also the real configurations for the per-rank weight accounting."""
from diffpar.testing.coverage import ALL_TP, ModelCase
from diffpar.testing.tiny_transformers import builder

CASES = [
    ModelCase("sd3", "SD3Transformer2DModel", cp=(), tp=ALL_TP, notes="TP plan: diffpar"),
    ModelCase("hunyuan_video", "HunyuanVideoTransformer3DModel", kind="video", cp=(), tp=ALL_TP,
              notes="TP plan: diffpar (token refiner included)"),
]

REAL_CONFIGS = {
    "SD3.5 Large": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
        joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192, qk_norm="rms_norm")),
    "SD3.5 Medium": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13)))),
    "HunyuanVideo": ("HunyuanVideoTransformer3DModel", dict(
        in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
        num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
        rope_axes_dim=(16, 56, 56))),
}


@builder("unplanned")
def _unplanned(heads=2, head_dim=8):
    """A denoiser-shaped model no plan names, for the tests of what diffpar says about a class it has no plan for
    (SD3 played that part until it got its tensor-parallel plan)."""
    import torch
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class UnplannedTransformer2DModel(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, dim: int = 16):
            super().__init__()
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, hidden_states, return_dict=False):
            return (self.proj(hidden_states),)

    model = UnplannedTransformer2DModel(dim=heads * head_dim)

    def inputs(seq=16, text=8, batch=1, seed=1):
        return dict(hidden_states=torch.randn(batch, seq, heads * head_dim,
                                              generator=torch.Generator().manual_seed(seed)))

    return model, inputs
