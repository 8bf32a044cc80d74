"""Tiny seeded VAEs of every family diffpar splits, and inputs for them, for tests and benchmarks.

`build(name, seed=0, **overrides)` returns (vae, make_latents, make_images). The configs keep each family's
structure (block types, attention in the mid block, causal caches, patchify, strided downsamplers) with few
channels, so a decode takes milliseconds on one CPU core. Heights and widths are parameters so tests can make
them odd or not divisible by the world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

BUILDERS: dict[str, Callable] = {}


@dataclass(frozen=True)
class VaeShape:
    latent_channels: int
    image_channels: int
    spatial: int  # image pixels per latent row/column (including patchify)
    video: bool
    frames_per_latent: int = 1  # images per latent frame after the first (video: temporal compression)
    decode_kwargs: tuple = ()  # (name, function of the latents) pairs: what vae.decode needs besides the latents
    single_frame: bool = False  # video-shaped (B, C, 1, H, W) input of an image VAE: one frame whatever is asked


def builder(name):
    def deco(fn):
        BUILDERS[name] = fn
        return fn

    return deco


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(seed)
    vae, shape = BUILDERS[name](**overrides)
    vae = vae.to(dtype).eval()

    def make_latents(height=12, width=10, batch=1, frames=2, seed=1):
        g = torch.Generator().manual_seed(seed)
        frames = 1 if shape.single_frame else frames
        dims = (batch, shape.latent_channels, frames, height, width) if shape.video else (
            batch, shape.latent_channels, height, width)
        return torch.randn(*dims, generator=g).to(dtype)

    def make_images(height=48, width=40, batch=1, frames=5, seed=2):
        g = torch.Generator().manual_seed(seed)
        frames = 1 if shape.single_frame else frames
        dims = (batch, shape.image_channels, frames, height, width) if shape.video else (
            batch, shape.image_channels, height, width)
        return (torch.rand(*dims, generator=g) * 2 - 1).to(dtype)

    vae.diffpar_shape = shape
    return vae, make_latents, make_images


def _kl_family(cls_name: str, channels, layers, groups, latent):
    import diffusers

    n = len(channels)
    vae = getattr(diffusers, cls_name)(
        block_out_channels=tuple(channels), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=layers, norm_num_groups=groups,
        latent_channels=latent,
    )
    return vae, VaeShape(latent, 3, 2 ** (n - 1), False)


@builder("kl")
def _kl(channels=(8, 16, 16), layers=1, groups=4, latent=4):
    """AutoencoderKL (SD / SDXL / SD3 / Flux.1 structure): 3x3 convs, GroupNorm, mid-block attention."""
    return _kl_family("AutoencoderKL", channels, layers, groups, latent)


@builder("flux2")
def _flux2(channels=(8, 16, 16), layers=1, groups=4, latent=4):
    return _kl_family("AutoencoderKLFlux2", channels, layers, groups, latent)


@builder("wan")
def _wan(base=8, mult=(1, 2, 2), blocks=1, latent=4, temporal=(False, True)):
    """Wan 2.1: causal conv3d with per-frame caches, RMS norms over channels, per-frame mid-block attention."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(
        base_dim=base, z_dim=latent, dim_mult=list(mult), num_res_blocks=blocks, temperal_downsample=list(temporal),
        latents_mean=[0.0] * latent, latents_std=[1.0] * latent,
    )
    return vae, VaeShape(latent, 3, 2 ** (len(mult) - 1), True, 2 ** sum(temporal))


@builder("wan22")
def _wan22(base=8, mult=(1, 2, 2), blocks=1, latent=4, temporal=(False, True)):
    """Wan 2.2: residual up/down blocks with space-to-depth shortcuts, patchify 2 outside the encoder/decoder."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(
        base_dim=base, z_dim=latent, dim_mult=list(mult), num_res_blocks=blocks, temperal_downsample=list(temporal),
        is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        latents_mean=[0.0] * latent, latents_std=[1.0] * latent,
    )
    return vae, VaeShape(latent, 3, 2 * 2 ** (len(mult) - 1), True, 2 ** sum(temporal))


@builder("qwen")
def _qwen(base=8, mult=(1, 2, 2), blocks=1, latent=4, temporal=(False, True)):
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(
        base_dim=base, z_dim=latent, dim_mult=list(mult), num_res_blocks=blocks, temperal_downsample=list(temporal),
        latents_mean=[0.0] * latent, latents_std=[1.0] * latent,
    )
    return vae, VaeShape(latent, 3, 2 ** (len(mult) - 1), True, 2 ** sum(temporal))


@builder("qwen21")
def _qwen21(base=8, mult=(1, 2, 2), blocks=1, latent=4, temporal=(False, True)):
    """Qwen-Image 2 (AutoencoderKLQwenImage21): Wan 2.2's residual layout for single images, with 2D causal convs."""
    from diffusers import AutoencoderKLQwenImage21

    vae = AutoencoderKLQwenImage21(
        base_dim=base, decoder_base_dim=base, z_dim=latent, dim_mult=list(mult), num_res_blocks=blocks,
        temperal_downsample=list(temporal), in_channels=3, out_channels=3,
        latents_mean=[0.0] * latent, latents_std=[1.0] * latent,
    )
    return vae, VaeShape(latent, 3, 2 ** (len(mult) - 1), True, single_frame=True)


@builder("hunyuan")
def _hunyuan(channels=(8, 16, 16), layers=1, groups=4, latent=4):
    """HunyuanVideo: replicate-padded causal conv3d, GroupNorm over frames, frame-causal mid-block attention."""
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo(
        block_out_channels=tuple(channels), down_block_types=("HunyuanVideoDownBlock3D",) * len(channels),
        up_block_types=("HunyuanVideoUpBlock3D",) * len(channels), layers_per_block=layers, norm_num_groups=groups,
        latent_channels=latent, spatial_compression_ratio=4, temporal_compression_ratio=4,
    )
    return vae, VaeShape(latent, 3, 4, True, 4)


@builder("hunyuan_image")
def _hunyuan_image(channels=(32, 64, 64), layers=1, latent=4):
    """HunyuanImage 2.1: GroupNorm of 32 groups (fixed by the model), space-to-depth / depth-to-space with shortcuts,
    single-head mid-block attention over the whole image; 4x spatial compression here (32x in the real model)."""
    from diffusers import AutoencoderKLHunyuanImage

    vae = AutoencoderKLHunyuanImage(
        in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=tuple(channels),
        layers_per_block=layers, spatial_compression_ratio=4, sample_size=64,
    )
    return vae, VaeShape(latent, 3, 4, False)


@builder("hunyuan_video15")
def _hunyuan_video15(channels=(8, 16, 16), layers=1, latent=4):
    """HunyuanVideo 1.5: replicate-padded causal conv3d, RMS norms, space-to-depth resampling (first frame apart),
    frame-causal single-head mid-block attention; 4x spatial, 4x temporal compression here (16x / 4x real)."""
    from diffusers import AutoencoderKLHunyuanVideo15

    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=tuple(channels),
        layers_per_block=layers, spatial_compression_ratio=4, temporal_compression_ratio=4,
    )
    return vae, VaeShape(latent, 3, 4, True, 4)


@builder("hunyuan_image_refiner")
def _hunyuan_image_refiner(channels=(8, 16, 16), layers=1, latent=4):
    """HunyuanImage 2.1's refiner: HunyuanVideo 1.5's layout with frame-uniform resampling and an unmasked
    single-head mid-block attention over every frame's pixels; 4x spatial, 4x temporal compression here (16x / 4x
    real)."""
    from diffusers import AutoencoderKLHunyuanImageRefiner

    vae = AutoencoderKLHunyuanImageRefiner(
        in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=tuple(channels),
        layers_per_block=layers, spatial_compression_ratio=4, temporal_compression_ratio=4,
    )
    # Three blocks leave no room for temporal downsampling: every image frame is a latent frame here.
    return vae, VaeShape(latent, 3, 4, True, 1)


@builder("magvit")
def _magvit(channels=(8, 16, 16), layers=1, groups=4, latent=4):
    """EasyAnimate's MagVit: causal conv3d with frame caches across calls, GroupNorm per frame, bottom-edge padded
    stride-2 downsamplers, nearest upsampling; the VAE runs the first frame alone, then frame batches (2 sample
    frames per encoder call here, 1 latent frame per decoder call) handing each conv's cache on. 4x spatial, 2x
    temporal compression here (8x / 4x real)."""
    from diffusers import AutoencoderKLMagvit

    n = len(channels)
    vae = AutoencoderKLMagvit(
        in_channels=3, latent_channels=latent, out_channels=3, block_out_channels=tuple(channels),
        down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * (n - 1),
        up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * (n - 1), layers_per_block=layers,
        norm_num_groups=groups,
    )
    vae.num_sample_frames_batch_size = 2
    return vae, VaeShape(latent, 3, 2 ** (n - 1), True, 2 ** (n - 2))


@builder("allegro")
def _allegro(channels=(8, 16, 16), layers=1, groups=4, latent=4):
    """Allegro: AutoencoderKL's 2D layers per frame between temporal conv layers, decoded and encoded only in tiles
    (diffusers has no untiled path). Tiles here: 11 x 10 latents every 2 latent rows and 3 frames, so a 13-row
    latent (52 image rows) runs two overlapping tiles, each split; no temporal compression (4x real)."""
    from diffusers import AutoencoderKLAllegro

    n = len(channels)
    vae = AutoencoderKLAllegro(
        in_channels=3, out_channels=3, block_out_channels=tuple(channels), latent_channels=latent,
        down_block_types=("AllegroDownBlock3D",) * n, up_block_types=("AllegroUpBlock3D",) * n,
        temporal_downsample_blocks=(False,) * n, temporal_upsample_blocks=(False,) * n, layers_per_block=layers,
        norm_num_groups=groups, temporal_compression_ratio=1, sample_size=44,
    )
    spatial = 2 ** (n - 1)
    vae.use_tiling = True
    vae.kernel, vae.stride = (3, 11 * spatial, 10 * spatial), (1, 2 * spatial, 2 * spatial)
    return vae, VaeShape(latent, 3, spatial, True, 1)


@builder("kvae")
def _kvae(channels=32, mult=(1, 1, 2), blocks=1, latent=4):
    """Kandinsky's KVAE (image): replicate / reflect padded convs, GroupNorm of 32 groups (fixed by the model), a
    latent-modulated decoder norm, pixel-(un)shuffle resampling beside strided / upsampled convs; 4x spatial
    compression here (8x real)."""
    from diffusers import AutoencoderKLKVAE

    vae = AutoencoderKLKVAE(in_channels=3, channels=channels, num_enc_blocks=blocks, num_dec_blocks=blocks,
                            z_channels=latent, ch_mult=tuple(mult))
    return vae, VaeShape(latent, 3, 2 ** (len(mult) - 1), False)


@builder("kvae_video")
def _kvae_video(channels=32, mult=(1, 1, 2), blocks=1, latent=4):
    """Kandinsky's KVAE (video): causal conv3d with time caches handed from one 16-frame segment to the next,
    GroupNorm of 32 groups (fixed by the model), a latent-modulated decoder norm, pixel-(un)shuffle resampling beside
    strided / upsampled convs, time resampling per pixel; 4x spatial, 4x temporal compression here (8x / 4x real)."""
    from diffusers import AutoencoderKLKVAEVideo

    vae = AutoencoderKLKVAEVideo(ch=channels, ch_mult=tuple(mult), num_res_blocks=blocks, in_channels=3, out_ch=3,
                                 z_channels=latent, temporal_compress_times=4)
    return vae, VaeShape(latent, 3, 2 ** (len(mult) - 1), True, 4)


@builder("minimax_h3")
def _minimax_h3(channels=(8, 16, 16), layers=1, groups=4, latent=4):
    """MiniMax-H3 video: reflect-padded causal conv3d encoder with per-frame GroupNorm, a ViT decoder (RoPE over the
    whole clip, register tokens, full self-attention); 4x spatial, 2x temporal compression here (16x / 4x real).
    Its zero-initialised residual scales and register tokens are drawn at random, so attention shapes the output."""
    from diffusers import AutoencoderKLMiniMaxH3

    vae = AutoencoderKLMiniMaxH3(
        in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=tuple(channels),
        layers_per_block=layers, spatial_downsample_factors=(2, 2, 1), temporal_downsample_factors=(1, 2, 1),
        norm_num_groups=groups, decoder_num_layers=2, decoder_num_attention_heads=2, decoder_attention_head_dim=16,
        decoder_num_register_tokens=2, decoder_ffn_mult=2, clip_length=5, token_drop=1,
        latents_mean=(0.0,) * latent, latents_std=(1.0,) * latent,
    )
    with torch.no_grad():
        for name, param in vae.decoder.named_parameters():
            if name.endswith(("scale1", "scale2")) or name == "register_tokens":
                param.normal_(0.0, 0.5)
    return vae, VaeShape(latent, 3, 4, True, 2)


@builder("cogvideox")
def _cogvideox(channels=(8, 16, 16), layers=1, groups=4, latent=4):
    """CogVideoX: causal conv3d with per-frame-batch conv caches, GroupNorm, latent-conditioned spatial norm,
    frame-pair averaging; 4x spatial, 4x temporal compression. Frame batches of 1 latent / 2 sample frames, so every
    decode and encode here runs several batches and hands the conv cache from one to the next."""
    from diffusers import AutoencoderKLCogVideoX

    n = len(channels)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=tuple(channels), down_block_types=("CogVideoXDownBlock3D",) * n,
        up_block_types=("CogVideoXUpBlock3D",) * n, latent_channels=latent, layers_per_block=layers,
        norm_num_groups=groups, temporal_compression_ratio=4,
    )
    vae.num_latent_frames_batch_size = 1
    vae.num_sample_frames_batch_size = 2
    # Random weights give outputs up to ~10 here; a trained VAE's lie in [-1, 1], the range VAE_FP32 is set for.
    with torch.no_grad():
        for conv in (vae.decoder.conv_out.conv, vae.encoder.conv_out.conv):
            conv.weight.mul_(0.2)
            conv.bias.mul_(0.2)
    return vae, VaeShape(latent, 3, 2 ** (n - 1), True, 4)


@builder("mochi")
def _mochi(channels=(32, 32, 32), latent=4):
    """Mochi 1: replicate-padded causal conv3d, per-frame GroupNorm (32 groups, fixed by the model), attention over
    each pixel's frames, strided-conv downsampling, linear depth-to-space upsampling; 4x spatial, 2x temporal here
    (8x / 6x real)."""
    from diffusers import AutoencoderKLMochi

    vae = AutoencoderKLMochi(
        encoder_block_out_channels=tuple(channels), decoder_block_out_channels=tuple(channels),
        latent_channels=latent, layers_per_block=(1,) * (len(channels) + 1), temporal_expansions=(1, 2),
        spatial_expansions=(2, 2), add_attention_block=(False,) + (True,) * len(channels),
        latents_mean=(0.0,) * latent, latents_std=(1.0,) * latent,
    )
    return vae, VaeShape(latent, 3, 4, True, 2)


@builder("temporal_decoder")
def _temporal_decoder(channels=(32, 32, 32), layers=1, latent=4):
    """Stable Video Diffusion: AutoencoderKL's encoder, a decoder that mixes frames per pixel (the batch of latents is
    one clip's frames), GroupNorm of 32 groups (fixed by the decoder)."""
    from diffusers import AutoencoderKLTemporalDecoder

    n = len(channels)
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=tuple(channels), down_block_types=("DownEncoderBlock2D",) * n, layers_per_block=layers,
        latent_channels=latent,
    )
    return vae, VaeShape(latent, 3, 2 ** (n - 1), False, decode_kwargs=(("num_frames", _frame_count),))


def _frame_count(latents):
    return latents.shape[0]


@builder("ltx")
def _ltx(channels=(8, 16, 16), decoder_channels=(16, 16, 16), latent=8):
    """LTX-Video: per-pixel RMS norms, causal conv3d (frame repeat), strided conv and space-to-depth downsampling
    (0.9.0 and 0.9.5 blocks), depth-to-space upsampling with residuals, patchify 2 inside encoder and decoder, a
    timestep-conditioned decoder (0.9.1+)."""
    from diffusers import AutoencoderKLLTXVideo

    vae = AutoencoderKLLTXVideo(
        latent_channels=latent, block_out_channels=tuple(channels), decoder_block_out_channels=tuple(decoder_channels),
        down_block_types=("LTXVideoDownBlock3D", "LTXVideo095DownBlock3D", "LTXVideoDownBlock3D"),
        downsample_type=("conv", "spatial", "conv"), layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True, True, False),
        decoder_spatio_temporal_scaling=(True, True, False), decoder_inject_noise=(False,) * 4,
        upsample_residual=(True, True, True), patch_size=2, timestep_conditioning=True,
    )
    return vae, VaeShape(latent, 3, 8, True, 2, decode_kwargs=(("temb", _timestep),))


def _timestep(latents):
    return torch.linspace(0.02, 0.08, latents.shape[0])


@builder("ltx2")
def _ltx2(patch_size=1, padding="reflect"):
    """LTX-2: per-pixel RMS norms, frame-repeat causal encoder convs and a centred (non-causal) reflect-padded decoder
    as in the real model, spatial / temporal / spatio-temporal space-to-depth downsamplers, depth-to-space upsamplers
    with residuals; 8x spatial, 8x temporal compression here (32x / 8x real, with patchify 4)."""
    from diffusers import AutoencoderKLLTX2Video

    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(16, 32, 64), layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True, True, True, True),
        decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False,) * 4,
        downsample_type=("spatial", "temporal", "spatiotemporal", "spatiotemporal"), upsample_residual=(True,) * 3,
        upsample_factor=(2, 2, 2), timestep_conditioning=False, patch_size=patch_size, patch_size_t=1,
        encoder_causal=True, decoder_causal=False, encoder_spatial_padding_mode="zeros",
        decoder_spatial_padding_mode=padding,
    )
    return vae, VaeShape(8, 3, 8 * patch_size, True, 8)


@builder("dc")
def _dc(channels=(8, 16, 32), latent=4):
    """Sana's DC-AE: ResBlocks with per-pixel RMS norms, EfficientViT blocks (multi-scale ReLU linear attention over
    the whole image) in the deeper stages, pixel (un)shuffle resampling with shortcuts; 4x spatial compression here
    (32x real)."""
    from diffusers import AutoencoderDC

    n = len(channels)
    blocks = ("ResBlock",) + ("EfficientViTBlock",) * (n - 1)
    scales = ((),) + ((5,),) * (n - 1)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=latent, attention_head_dim=4, encoder_block_types=blocks,
        decoder_block_types=blocks, encoder_block_out_channels=tuple(channels),
        decoder_block_out_channels=tuple(channels), encoder_layers_per_block=(1,) * n,
        decoder_layers_per_block=(1,) * n, encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales,
        upsample_block_type="pixel_shuffle", downsample_block_type="pixel_unshuffle",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    return vae, VaeShape(latent, 3, 2 ** (n - 1), False)


@builder("cosmos")
def _cosmos(channels=(8, 8, 8, 8), latent=4):
    """Cosmos tokenizer: Haar-wavelet patchify 4, causal conv3d padding its own rows, per-frame GroupNorm, a
    downsampler with bottom-edge padding, stride-2 conv and 2x2 average, spatial and temporal attention; 8x spatial,
    4x temporal compression here (8x / 8x real)."""
    from diffusers import AutoencoderKLCosmos

    vae = AutoencoderKLCosmos(
        in_channels=3, out_channels=3, latent_channels=latent, encoder_block_out_channels=tuple(channels),
        decode_block_out_channels=tuple(channels), attention_resolutions=(8,), resolution=64, num_layers=1,
        patch_size=4, patch_type="haar", spatial_compression_ratio=8, temporal_compression_ratio=4,
        latents_mean=None, latents_std=None,
    )
    return vae, VaeShape(latent, 3, 8, True, 4)


@builder("kl_real")
def _kl_real(channels=(32, 64, 128, 128), layers=2, groups=32, latent=16):
    """AutoencoderKL shaped like Flux.1's (4 blocks, 2 resnets per down block, 3 per up block, 16 latent channels),
    with channels scaled down 4x so a 1024 px decode takes seconds on one CPU core. For benchmarks."""
    from diffusers import AutoencoderKL

    n = len(channels)
    vae = AutoencoderKL(
        block_out_channels=tuple(channels), down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=layers, norm_num_groups=groups,
        latent_channels=latent, use_quant_conv=False, use_post_quant_conv=False,
    )
    return vae, VaeShape(latent, 3, 2 ** (n - 1), False)


# -- LTX-2 audio (issue 13 item 3) ------------------------------------------------------------------------------
@builder("ltx2_audio")
def _ltx2_audio(channels=8, mult=(1, 2, 4), blocks=1, latent=4, mel_bins=16, causality_axis="height",
                mid_attention=False):
    """LTX-2's audio VAE on a (B, C, time, mel) spectrogram: rows are time steps. Causal convs in time (a one-sided
    halo), per-pixel RMS norms, causal stride-2 downsamplers, nearest x2 upsamplers that drop the clip's first row,
    a decoder cropping to 4 * frames - 3 time steps. Real: 128 channels, 2 blocks, 8 latent channels, 64 mel bins.
    Use latent width mel_bins / 4 (16 / 4 = 4 here) for a decode whose mel axis is not cropped."""
    from diffusers import AutoencoderKLLTX2Audio

    vae = AutoencoderKLLTX2Audio(base_channels=channels, output_channels=2, in_channels=2, ch_mult=tuple(mult),
                                 num_res_blocks=blocks, latent_channels=latent, norm_type="pixel",
                                 causality_axis=causality_axis, mel_bins=mel_bins,
                                 mid_block_add_attention=mid_attention)
    return vae, VaeShape(latent, 2, 2 ** (len(mult) - 1), False)


@builder("ltx2_audio_width_attention")
def _ltx2_audio_width_attention():
    """The same VAE causal along mel bins instead (time padded on both sides: a two-sided halo; the decoder crops
    the clip's last 3 time steps), with attention over the whole spectrogram in both mid blocks. No released
    config has either; they cover the rules' other branches."""
    return _ltx2_audio(causality_axis="width", mid_attention=True)


@builder("ltx2_audio_two_levels")
def _ltx2_audio_two_levels():
    """Two levels instead of three: the decoder's output (2 * frames - 1 time steps) is shorter than its target
    (4 * frames - 3), so diffusers zero-pads the clip's end (the last band's, when split)."""
    return _ltx2_audio(mult=(1, 2))


def decode(vae, latents) -> torch.Tensor:
    extra = {k: make(latents) for k, make in getattr(getattr(vae, "diffpar_shape", None), "decode_kwargs", ())}
    with torch.no_grad():
        return vae.decode(latents, **extra).sample


def encode(vae, images) -> torch.Tensor:
    """The posterior's mean and log-variance (deterministic, unlike a sample); a deterministic encoder's latents."""
    with torch.no_grad():
        out = vae.encode(images)
    return out.latent_dist.parameters if hasattr(out, "latent_dist") else out.latent
