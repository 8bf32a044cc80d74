"""Tensor parallelism for first families that had context parallelism only (SD3, HunyuanVideo)."""
from diffpar.testing.tiny_transformers import builder

CASES = []


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
