"""Tiny LTX-Video and LTX-2 transformers, their cases, and the real configurations for the weight-bytes benchmark."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct, prompt_mask


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@builder("ltx_video")
def _ltx_video(heads=4, head_dim=16, layers=2):
    from diffusers import LTXVideoTransformer3DModel

    inner = heads * head_dim
    model = construct(
        LTXVideoTransformer3DModel, in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
        num_attention_heads=heads, attention_head_dim=head_dim, cross_attention_dim=inner, num_layers=layers,
        caption_channels=24,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, frames=1, text_padding=2, per_token_timestep=False):
        # Video tokens = frames * height * width with height 1: width = seq // frames (frames 1 keeps any seq).
        # The prompt's last `text_padding` tokens are padding (mask 0), as the pipeline's tokenizer pads.
        # `per_token_timestep`: a (B, tokens) timestep with the first frame at 0, as the image-to-video pipeline.
        g = _gen(seed)
        width = seq // frames
        mask = prompt_mask(batch, text, text_padding, dtype=torch.long)
        timestep = torch.full((batch,), 500.0)
        if per_token_timestep:
            timestep = torch.full((batch, frames * width), 500.0)
            timestep[:, :width] = 0.0
        return dict(
            hidden_states=torch.randn(batch, frames * width, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
            timestep=timestep,
            encoder_attention_mask=mask,
            num_frames=frames, height=1, width=width,
            return_dict=False,
        )

    return model, inputs


@builder("ltx2_video")
def _ltx2_video(heads=4, head_dim=16, layers=2, rope_type="interleaved"):
    from diffusers import LTX2VideoTransformer3DModel

    model = construct(
        LTX2VideoTransformer3DModel, in_channels=8, out_channels=8, num_attention_heads=heads,
        attention_head_dim=head_dim, cross_attention_dim=heads * head_dim, audio_in_channels=8, audio_out_channels=8,
        audio_num_attention_heads=heads, audio_attention_head_dim=8, audio_cross_attention_dim=heads * 8,
        num_layers=layers, caption_channels=24, rope_type=rope_type,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, frames=1, audio=5, text_padding=2):
        # Video tokens = frames * 1 * (seq // frames); `audio` audio tokens (kept whole on every rank).
        g = _gen(seed)
        width = seq // frames
        mask = prompt_mask(batch, text, text_padding, dtype=torch.long)
        return dict(
            hidden_states=torch.randn(batch, frames * width, 8, generator=g),
            audio_hidden_states=torch.randn(batch, audio, 8, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
            audio_encoder_hidden_states=torch.randn(batch, text, 24, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_attention_mask=mask, audio_encoder_attention_mask=mask.clone(),
            num_frames=frames, height=1, width=width, audio_num_frames=audio,
            return_dict=False,
        )

    return model, inputs


CASES = [
    ModelCase("ltx_video", "LTXVideoTransformer3DModel", kind="video",
              notes="our plan replaces diffusers' (prompt whole, cross-attention local)"),
    ModelCase("ltx_video_i2v", "LTXVideoTransformer3DModel", kind="video", cp=("w2-ulysses", "w2-ring",
              "w4-ring-anything-odd"), tp=(), input_kwargs={"per_token_timestep": True, "frames": 1},
              notes="per-token timestep (image-to-video)"),
    ModelCase("ltx2_video", "LTX2VideoTransformer3DModel", kind="video",
              notes="our plan replaces diffusers' (video split; audio and prompt whole)"),
    ModelCase("ltx2_video_split_rope", "LTX2VideoTransformer3DModel", kind="video",
              cp=("w2-ulysses", "w4-ulysses2xring2", "w2-ulysses-anything-odd"), tp=(),
              model_kwargs={"heads": 4, "rope_type": "split"}, notes="LTX-2.3's split RoPE layout"),
]
builder("ltx2_video_split_rope")(_ltx2_video)
# The i2v case shares the builder under its own name so that its test ids differ.
builder("ltx_video_i2v")(_ltx_video)

REAL_CONFIGS = {
    "LTX-Video 0.9 (2B)": ("LTXVideoTransformer3DModel", dict(
        in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
        attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096)),
    "LTX-2 (19B)": ("LTX2VideoTransformer3DModel", dict(
        in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=128, cross_attention_dim=4096,
        audio_in_channels=128, audio_out_channels=128, audio_num_attention_heads=32, audio_attention_head_dim=64,
        audio_cross_attention_dim=2048, num_layers=48, caption_channels=3840)),
}
