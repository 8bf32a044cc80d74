"""Nucleus-MoE Image (`NucleusMoEImageTransformer2DModel`): a tiny seeded model (one dense block, one MoE block
with expert-choice routing) and its case."""
import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct

from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks  # noqa: E402

CASES = [ModelCase("nucleusmoe", "NucleusMoEImageTransformer2DModel",
                   notes="MoE layers route on the whole sequence under CP; routed experts split along their width")]
# The pipeline pads every prompt to a multiple of 8 tokens: a padded prompt (5 real of 8) under Ulysses, where the
# release's context-parallel attention takes masks (Ring refuses a real mask clearly; 0.36 takes none).
if context_parallel_attention_takes_masks():
    CASES.append(ModelCase("nucleusmoe_padded", "NucleusMoEImageTransformer2DModel",
                           cp=("w2-ulysses", "w4-ulysses"), tp=(),
                           notes="padded prompt: the mask cut per rank by the family's processor"))

REAL_CONFIGS = {
    # diffusers' defaults for the class (the released model's shape).
    "Nucleus-MoE Image": ("NucleusMoEImageTransformer2DModel", dict(
        patch_size=2, in_channels=64, num_layers=24, attention_head_dim=128, num_attention_heads=16,
        joint_attention_dim=3584, axes_dims_rope=(16, 56, 56), moe_enabled=True, num_experts=128,
        moe_intermediate_dim=1344, capacity_factors=8.0)),
}


@builder("nucleusmoe")
def _nucleusmoe(heads=2, head_dim=16, layers=2, kv_heads=None):
    from diffusers import NucleusMoEImageTransformer2DModel

    model = construct(
        NucleusMoEImageTransformer2DModel,
        patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=head_dim, num_attention_heads=heads,
        num_key_value_heads=kv_heads, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), moe_enabled=True,
        dense_moe_strategy="leave_first_block_dense", num_experts=4, moe_intermediate_dim=32, capacity_factors=2.0,
    )
    # The routed experts are created uninitialized (torch.empty): seed them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.copy_(torch.randn(p.shape) * 0.1)

    def inputs(seq=16, text=8, batch=1, seed=1, valid=None):
        # Image tokens on a 1 x seq grid; `valid`: real prompt tokens per row (right-padded).
        g = torch.Generator().manual_seed(seed)
        out = dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            img_shapes=[(1, 1, seq)] * batch,
            encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
            timestep=torch.full((batch,), 0.5),
            return_dict=False,
        )
        if valid is not None:
            out["encoder_hidden_states_mask"] = torch.arange(text)[None] < torch.tensor(valid)[:, None]
        return out

    return model, inputs


@builder("nucleusmoe_padded")
def _nucleusmoe_padded(**kwargs):
    """The same model; its inputs carry a right-padded prompt mask (5 real tokens by default), as the pipeline's."""
    model, inputs = _nucleusmoe(**kwargs)

    def padded_inputs(valid=None, **input_kwargs):
        return inputs(valid=valid if valid is not None else [5] * input_kwargs.get("batch", 1), **input_kwargs)

    return model, padded_inputs
