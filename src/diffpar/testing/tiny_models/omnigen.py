"""OmniGen (`OmniGenTransformer2DModel`): a tiny seeded model and its case."""
import torch

from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks
from diffpar.testing.coverage import ALL_TP, ModelCase
from diffpar.testing.tiny_transformers import builder, construct

# The pipeline always passes OmniGen's causal prompt mask, which ring attention cannot apply: Ulysses layouts only;
# and none where the release's context-parallel attention takes no mask at all (0.36 refuses it clearly).
_TAKES_MASKS = context_parallel_attention_takes_masks()
CASES = [ModelCase("omnigen", "OmniGenTransformer2DModel",
                   cp=("w2-ulysses", "w4-ulysses", "w2-ulysses-anything-odd") if _TAKES_MASKS else (),
                   tp=ALL_TP if _TAKES_MASKS else ("w2-tp", "w4-tp"),
                   notes="the causal prompt mask: Ulysses applies it whole, Ring refuses it")]

_ROPE_SCALING = {"long_factor": [1.0] * 4, "short_factor": [1.0] * 4}

REAL_CONFIGS = {
    "OmniGen-v1": ("OmniGenTransformer2DModel", dict(
        in_channels=4, patch_size=2, hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=8192, num_layers=32, vocab_size=32064, pos_embed_max_size=192,
        rope_scaling={"long_factor": [1.0] * 48, "short_factor": [1.0] * 48})),
}


@builder("omnigen")
def _omnigen(heads=2, head_dim=8, layers=2):
    from diffusers import OmniGenTransformer2DModel

    model = construct(
        OmniGenTransformer2DModel,
        in_channels=4, patch_size=2, hidden_size=heads * head_dim, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=32, num_layers=layers, vocab_size=64, pad_token_id=0,
        pos_embed_max_size=32, time_step_dim=16, rope_scaling={"long_factor": [1.0] * (head_dim // 2),
                                                               "short_factor": [1.0] * (head_dim // 2)},
    )

    def inputs(seq=16, text=8, batch=1, seed=1, causal=True):
        # Sequence: [text prompt tokens, time token, seq image tokens (H = 2, W = 2 * seq)]; the prompt is made odd
        # so the sequence is as odd as `seq`. `causal`: OmniGen's mask (causal prompt, bidirectional image).
        g = torch.Generator().manual_seed(seed)
        text += 1 - text % 2
        total = text + 1 + seq
        out = dict(
            hidden_states=torch.randn(batch, 4, 2, 2 * seq, generator=g),
            timestep=torch.full((batch,), 0.5),
            input_ids=torch.randint(1, 64, (batch, text), generator=g),
            input_img_latents=[],
            input_image_sizes={},
            position_ids=torch.arange(total).expand(batch, total).clone(),
            return_dict=False,
        )
        if causal:
            mask = torch.tril(torch.ones(total, total))
            mask[text:, :] = 1  # the time token and the image attend to everything
            mask[:text, text:] = 0
            out["attention_mask"] = mask.expand(batch, total, total).clone()
        else:
            out["attention_mask"] = None
        return out

    return model, inputs
