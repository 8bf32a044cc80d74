"""Tiny, seeded, complete diffusers pipelines for tests, benchmarks and the demo (no Hub access needed).

`build_tiny_flux_pipeline()`: FluxPipeline with a CLIP text encoder, a T5 (gated-gelu) encoder, a tiny
FluxTransformer2DModel, a tiny AutoencoderKL and FlowMatchEulerDiscreteScheduler; tokenizers built in memory.
`build_tiny_wan_pipeline()`: WanPipeline with a UMT5 encoder, a tiny WanTransformer3DModel and a tiny
AutoencoderKLWan. Head counts default to 4 so Ulysses and text-encoder TP both work on 2 and 4 ranks.
Every call with the same arguments builds the same weights, so each rank (and a one-process reference)
can build its own copy.

Sizes that make a valid call: Flux `height = width = 32` (multiples of 4), `max_sequence_length=16`;
Wan `height = width = 32`, `num_frames=5` (4k + 1), `max_sequence_length=16`.
"""
from __future__ import annotations

import torch

from . import tiny_text_encoders
from diffpar.testing.tiny_transformers import rope_axes


def tiny_image_vae(seed: int, shift_factor: float, scaling_factor: float):
    """A two-block AutoencoderKL with 4 latent channels (scale and shift as the real pipeline's VAE)."""
    from diffusers import AutoencoderKL

    _seeded(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    ).eval()


def _seeded(seed: int):
    torch.manual_seed(seed)


def build_tiny_flux_pipeline(seed: int = 0, heads: int = 4, head_dim: int = 16, layers: int = 1,
                             single_layers: int = 1, text_heads: int = 4, t5_attn: str = "sdpa",
                             clip_attn: str = "sdpa"):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    text_width = 32
    clip, _ = tiny_text_encoders.build("clip", attn=clip_attn, seed=seed, heads=text_heads, hidden=text_width,
                                       intermediate=37, layers=2, max_positions=16)
    t5, _ = tiny_text_encoders.build("t5-gated", attn=t5_attn, seed=seed + 1, heads=text_heads, d_kv=8,
                                     d_model=text_width, d_ff=61, layers=2)
    _seeded(seed + 2)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_width,
        pooled_projection_dim=text_width, guidance_embeds=True, axes_dims_rope=rope_axes(head_dim),
    ).eval()
    vae = tiny_image_vae(seed + 3, shift_factor=0.0609, scaling_factor=1.5035)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tiny_text_encoders.clip_tokenizer(16),
        text_encoder_2=t5, tokenizer_2=tiny_text_encoders.t5_tokenizer(512), transformer=transformer,
    )


def build_tiny_wan_pipeline(seed: int = 0, heads: int = 4, head_dim: int = 12, layers: int = 2,
                            text_heads: int = 4, attn: str = "sdpa"):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    text_width = 32
    umt5, _ = tiny_text_encoders.build("umt5", attn=attn, seed=seed, heads=text_heads, d_kv=8, d_model=text_width,
                                       d_ff=48, layers=2)
    _seeded(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
        out_channels=16, text_dim=text_width, freq_dim=32, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    _seeded(seed + 3)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    return WanPipeline(tokenizer=tiny_text_encoders.t5_tokenizer(512), text_encoder=umt5, vae=vae,
                       scheduler=scheduler, transformer=transformer)
