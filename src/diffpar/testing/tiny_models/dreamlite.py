"""DreamLite (`DreamLiteTransformer2DModel`, the attention stage of the DreamLite U-Net): tiny seeded builders,
harness cases, real configuration.

`dreamlite`: as the U-Net builds it (one key/value head, per-head RMS q/k norm, the U-Net's GQA processor
`DreamLiteAttnProcessor2_0`, 1x1 conv projections, two blocks). `dreamlite_gqa`: the same with two key/value heads for four query heads. `dreamlite_mha`: the class's own defaults for
attention (as many key/value heads as query heads, `AttnProcessor2_0`), linear projections and a single block
(the plan's gather then names that same block).
"""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct, prompt_mask


def grid(tokens: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == tokens, as square as the count allows (16 -> 4 x 4, 15 -> 3 x 5)."""
    rows = max(r for r in range(1, int(tokens ** 0.5) + 1) if tokens % r == 0)
    return rows, tokens // rows


def _dreamlite_model(heads, head_dim, layers, kv_heads, linear_projection):
    from diffusers import DreamLiteTransformer2DModel

    return construct(
        DreamLiteTransformer2DModel,
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=8, num_layers=layers,
        norm_num_groups=4, cross_attention_dim=16, use_linear_projection=linear_projection,
        qk_norm="rms_norm", num_kv_heads=kv_heads, ff_mult=6,
    )


def _inputs_for(channels: int = 8, cross_dim: int = 16):
    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0):
        # seq latent pixels (= tokens: DreamLite has no patches) on a rows x cols grid; text_padding masks the
        # prompt's last tokens (the cross-attention mask, which stays whole on every rank).
        g = torch.Generator().manual_seed(seed)
        rows, cols = grid(seq)
        mask = prompt_mask(batch, text, text_padding)
        return dict(
            hidden_states=torch.randn(batch, channels, rows, cols, generator=g),
            encoder_hidden_states=torch.randn(batch, text, cross_dim, generator=g),
            encoder_attention_mask=mask,
            return_dict=False,
        )

    return inputs


@builder("dreamlite")
def _dreamlite(heads=4, head_dim=8, layers=2, kv_heads=1):
    from diffusers.models.unets.unet_dreamlite import DreamLiteAttnProcessor2_0

    model = _dreamlite_model(heads, head_dim, layers, kv_heads, linear_projection=False)
    for module in model.modules():  # the U-Net's processor, as DreamLiteUNetModel installs it
        if hasattr(module, "set_processor"):
            module.set_processor(DreamLiteAttnProcessor2_0())
    return model, _inputs_for()


@builder("dreamlite_gqa")
def _dreamlite_gqa(heads=4, head_dim=8, layers=2, kv_heads=2):
    return _dreamlite(heads=heads, head_dim=head_dim, layers=layers, kv_heads=kv_heads)


@builder("dreamlite_mha")
def _dreamlite_mha(heads=4, head_dim=8, layers=1):
    return _dreamlite_model(heads, head_dim, layers, kv_heads=None, linear_projection=True), _inputs_for()


CASES = [
    ModelCase("dreamlite", "DreamLiteTransformer2DModel", input_kwargs={"text_padding": 3},
              notes="U-Net attention stage (1 key/value head): blocks split; the one key/value head held by every rank under TP"),
    ModelCase("dreamlite_gqa", "DreamLiteTransformer2DModel", input_kwargs={"text_padding": 3},
              cp=("w2-ulysses", "w4-ring-anything-odd"), tp=("w2-tp", "w4-ulysses2xtp2"),
              notes="2 key/value heads for 4 query heads: TP gives each rank whole key/value heads"),
    ModelCase("dreamlite_mha", "DreamLiteTransformer2DModel", input_kwargs={"text_padding": 3},
              cp=("w2-ulysses", "w2-ring", "w2-ulysses-anything-odd"),
              notes="one block, linear projections, as many key/value heads as query heads"),
]

# The DreamLite U-Net's deepest attention stage with DreamLiteUNetModel's defaults (block_out_channels[-1]=1280,
# attention_head_dim=64 read as 64 heads of 1280 // 64 = 20, cross_attention_dim=2048, qk_norm="rms_norm",
# num_kv_heads=1, ff_mult=6, one layer).
REAL_CONFIGS = {
    "DreamLite U-Net mid attention (1280 ch)": ("DreamLiteTransformer2DModel", dict(
        num_attention_heads=64, attention_head_dim=20, in_channels=1280, num_layers=1, norm_num_groups=32,
        cross_attention_dim=2048, qk_norm="rms_norm", num_kv_heads=1, ff_mult=6)),
}


@builder("dreamlite_unet")
def _dreamlite_unet(heads=4, layers=1):
    """The DreamLite U-Net: one attention stage with self-attention and one without on the way down, the mid
    stage, one on the way up; `heads` heads of 4 channels at the first level (attention_head_dim is read as heads)."""
    from diffusers import DreamLiteUNetModel

    model = construct(
        DreamLiteUNetModel,
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DreamLiteCrossAttnDownBlock2D", "DreamLiteCrossAttnNoSelfAttnDownBlock2D"),
        up_block_types=("DreamLiteCrossAttnUpBlock2D", "DreamLiteUpBlock2D"),
        block_out_channels=(4 * heads, 8 * heads), layers_per_block=1, transformer_layers_per_block=layers,
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=heads, qk_norm="rms_norm", num_kv_heads=1,
        ff_mult=6,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0):
        # A (2 rows) x (2 cols) latent: 4 * seq tokens in the first stage, seq after the one downsampling.
        g = torch.Generator().manual_seed(seed)
        rows, cols = grid(seq)
        mask = prompt_mask(batch, text, text_padding)
        return dict(
            sample=torch.randn(batch, 4, 2 * rows, 2 * cols, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            encoder_attention_mask=mask,
            return_dict=False,
        )

    return model, inputs


CASES.append(ModelCase("dreamlite_unet", "DreamLiteUNetModel", input_kwargs={"text_padding": 3}, tp=(),
                       model_kwargs={"heads": 4}, pipelines=("DreamLitePipeline",),
                       notes="every attention stage split; ResNets and resampling whole on every rank"))
