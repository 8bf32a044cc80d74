"""Tiny Wan derivatives (VACE, SkyReels-V2, Wan Animate, Wan Animate 2), their cases and real configs."""
from __future__ import annotations

import torch

from diffpar.families.transformers.wan_variants import WAN_ANIMATE_2_REFUSAL
from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


def _gen(seed):
    return torch.Generator().manual_seed(seed)


_WAN_SMALL = dict(patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                  rope_max_seq_len=64)


@builder("wan_vace")
def _wan_vace(heads=4, head_dim=12, layers=2):
    from diffusers import WanVACETransformer3DModel

    model = construct(WanVACETransformer3DModel, num_attention_heads=heads, attention_head_dim=head_dim,
                      num_layers=layers, vace_layers=[0, 1], vace_in_channels=8, **_WAN_SMALL)

    def inputs(seq=16, text=8, batch=1, seed=1):
        # Video tokens = 1 frame * (H/2) * (W/2) with H = 2: W = 2 * seq; the control latents have the same grid.
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, 4, 1, 2, 2 * seq, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            control_hidden_states=torch.randn(batch, 8, 1, 2, 2 * seq, generator=g),
            control_hidden_states_scale=torch.tensor([1.0, 0.5]),
            return_dict=False,
        )

    return model, inputs


@builder("skyreels_v2")
def _skyreels_v2(heads=4, head_dim=12, layers=2, image=False, sample_info=False, causal_block=1):
    from diffusers import SkyReelsV2Transformer3DModel

    inner = heads * head_dim
    extra = dict(image_dim=24, added_kv_proj_dim=inner) if image else {}
    if sample_info:  # the fps conditioning of the diffusion-forcing checkpoints
        extra["inject_sample_info"] = True
    if causal_block > 1:  # asynchronous diffusion forcing
        extra["num_frame_per_block"] = causal_block
    model = construct(SkyReelsV2Transformer3DModel, num_attention_heads=heads, attention_head_dim=head_dim,
                      num_layers=layers, **_WAN_SMALL, **extra)

    def inputs(seq=16, text=8, batch=1, seed=1, diffusion_forcing=False):
        # Diffusion forcing: 1 timestep per latent frame. Frames: 2 for an even seq (seq / 2 tokens each), 3 for an
        # odd one (seq // 3 tokens each, an odd count when seq // 3 is odd, as for 15 and 17).
        g = _gen(seed)
        frames = 2 if seq % 2 == 0 else 3
        width = seq // frames
        kw = dict(
            hidden_states=torch.randn(batch, 4, frames, 2, 2 * width, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            return_dict=False,
        )
        if diffusion_forcing:
            kw["timestep"] = torch.linspace(0.0, 900.0, frames).repeat(batch, 1)
            kw["enable_diffusion_forcing"] = True
        if sample_info:
            kw["fps"] = [1]
        if image:  # the I2V processor takes all but the last 512 context tokens as image context
            kw["encoder_hidden_states"] = torch.randn(batch, 512, 32, generator=g)
            kw["encoder_hidden_states_image"] = torch.randn(batch, 3, 24, generator=g)
        return kw

    return model, inputs


@builder("wan_animate")
def _wan_animate(heads=4, head_dim=12, layers=2):
    from diffusers import WanAnimateTransformer3DModel

    # Small motion encoder (diffusers' own test sizes), a face adapter after every block.
    model = construct(
        WanAnimateTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=12, latent_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers,
        image_dim=24, rope_max_seq_len=64, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16,
        face_encoder_num_heads=2, inject_face_latents_blocks=1,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        # Latent frames: 2 for an even seq (seq / 2 tokens each), 3 for an odd one (seq // 3 each: 15 tokens for 15
        # and 17, split across frame boundaries). The face video has 4 * (frames - 1) frames (the face encoder
        # downsamples time by 4; a zero frame is prepended for the reference frame).
        g = _gen(seed)
        frames = 2 if seq % 2 == 0 else 3
        width = seq // frames
        return dict(
            hidden_states=torch.randn(batch, 12, frames, 2, 2 * width, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            encoder_hidden_states_image=torch.randn(batch, 3, 24, generator=g),
            pose_hidden_states=torch.randn(batch, 4, frames - 1, 2, 2 * width, generator=g),
            face_pixel_values=torch.randn(batch, 3, 4 * (frames - 1), 16, 16, generator=g),
            return_dict=False,
        )

    return model, inputs


@builder("wan_animate_2")
def _wan_animate_2(heads=4, head_dim=12, layers=2):
    from diffusers import WanAnimate2Transformer3DModel

    dim = heads * head_dim
    model = construct(WanAnimate2Transformer3DModel, patch_size=(1, 2, 2), text_len=16, in_dim=8, dim=dim, ffn_dim=64,
                      freq_dim=32, text_dim=32, out_dim=4, num_heads=heads, num_layers=layers, use_img_emb=False)

    def inputs(seq=16, text=8, batch=1, seed=1):
        # The reference pass ("extract", dense self-attention; it fills the KV cache): 1 frame, H = 2, W = 2 * seq.
        from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

        g = _gen(seed)
        grid = torch.tensor([[1, 1, seq]])
        return dict(
            hidden_states=[torch.randn(4, 1, 2, 2 * seq, generator=g) for _ in range(batch)],
            condition_latents=[torch.randn(4, 1, 2, 2 * seq, generator=g) for _ in range(batch)],
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=[torch.randn(text, 32, generator=g) for _ in range(batch)],
            kv_cache=WanAnimate2KVCache(layers), kv_cache_mode="extract", seq_len=seq, offset_grid_sizes=grid,
            return_dict=False,
        )

    return model, inputs


builder("wan_animate_2_refused")(_wan_animate_2)
builder("skyreels_v2_df")(_skyreels_v2)
builder("skyreels_v2_causal")(_skyreels_v2)
builder("skyreels_v2_i2v")(_skyreels_v2)

CASES = [
    ModelCase("wan_vace", "WanVACETransformer3DModel", kind="video", notes="control branch split with the video"),
    ModelCase("skyreels_v2", "SkyReelsV2Transformer3DModel", kind="video"),
    ModelCase("skyreels_v2_df", "SkyReelsV2Transformer3DModel", kind="video", tp=("w2-tp", "w4-ulysses2xtp2"),
              model_kwargs={"heads": 4, "sample_info": True}, input_kwargs={"diffusion_forcing": True},
              notes="diffusion forcing: a timestep per frame; fps conditioning"),
    ModelCase("skyreels_v2_i2v", "SkyReelsV2Transformer3DModel", kind="video",
              cp=("w2-ulysses", "w2-ring", "w2-ulysses-anything-odd"), tp=("w2-tp",),
              model_kwargs={"heads": 4, "image": True}, notes="image-to-video (image context)"),
    ModelCase("skyreels_v2_causal", "SkyReelsV2Transformer3DModel", kind="video", cp=(), tp=(),
              model_kwargs={"heads": 4, "causal_block": 2}, refused="causal mask over the whole video"),
    ModelCase("wan_animate", "WanAnimateTransformer3DModel", kind="video",
              notes="face adapters attend per frame on each rank's shard"),
    ModelCase("wan_animate_2", "WanAnimate2Transformer3DModel", kind="video", cp=(), tp=("w2-tp", "w4-tp"),
              notes="TP only: context parallelism refused (see wan_animate_2_refused)"),
    ModelCase("wan_animate_2_refused", "WanAnimate2Transformer3DModel", kind="video", cp=(), tp=(),
              refused=WAN_ANIMATE_2_REFUSAL),
]

_WAN14B = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads")
REAL_CONFIGS = {
    "Wan2.1-VACE-14B": ("WanVACETransformer3DModel", dict(_WAN14B, vace_layers=[0, 5, 10, 15, 20, 25, 30, 35],
                                                          vace_in_channels=96)),
    "Wan2.2-Animate-14B": ("WanAnimateTransformer3DModel", dict(_WAN14B, in_channels=36, latent_channels=16,
                                                                image_dim=1280)),
    "Wan2.2-Animate-2": ("WanAnimate2Transformer3DModel", dict(
        patch_size=(1, 2, 2), text_len=512, in_dim=36, dim=5120, ffn_dim=13824, freq_dim=256, text_dim=4096,
        out_dim=16, num_heads=40, num_layers=40, use_img_emb=True)),
    "SkyReels-V2-DF-14B": ("SkyReelsV2Transformer3DModel", dict(_WAN14B, inject_sample_info=True)),
}
