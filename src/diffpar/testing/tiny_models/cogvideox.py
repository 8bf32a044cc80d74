"""Tiny CogVideoX and ConsisID transformers (same blocks: joint [text, video] attention, RoPE on the video part)."""
from __future__ import annotations

import torch

from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _video_and_rope(batch, seq, channels, head_dim, rotary, g):
    """One latent frame of 2 x 2*seq pixels: seq video tokens with 2x2 patches (an odd seq gives odd tokens)."""
    video = torch.randn(batch, 1, channels, 2, 2 * seq, generator=g)
    rope = None
    if rotary:  # (cos, sin) per video token, as the pipeline computes them for the whole video
        angles = torch.rand(seq, head_dim // 2, generator=g) * 6.0
        rope = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    return video, rope


@builder("cogvideox")
def _cogvideox(heads=2, head_dim=16, layers=2, rotary=True):
    from diffusers import CogVideoXTransformer3DModel

    model = construct(
        CogVideoXTransformer3DModel,
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=layers, sample_width=8, sample_height=8, sample_frames=1, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=64, use_rotary_positional_embeddings=rotary,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        g = _gen(seed)
        video, rope = _video_and_rope(batch, seq, 4, head_dim, rotary, g)
        return dict(
            hidden_states=video,
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            timestep=torch.full((batch,), 500, dtype=torch.long),
            image_rotary_emb=rope,
            return_dict=False,
        )

    return model, inputs


@builder("consisid")
def _consisid(heads=2, head_dim=16, layers=2, face=True):
    from diffusers import ConsisIDTransformer3DModel

    inner = heads * head_dim
    model = construct(
        ConsisIDTransformer3DModel,
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=layers, sample_width=8, sample_height=8, sample_frames=1, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=64, use_rotary_positional_embeddings=True,
        is_train_face=face, is_kps=False, cross_attn_interval=1, cross_attn_dim_head=8, cross_attn_num_heads=4,
        LFE_id_dim=12, LFE_vit_dim=8, LFE_depth=2, LFE_dim_head=4, LFE_num_heads=4, LFE_num_id_token=2,
        LFE_num_querie=3, LFE_output_dim=int(inner / 3 * 2), LFE_ff_mult=2, LFE_num_scale=2,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        g = _gen(seed)
        video, rope = _video_and_rope(batch, seq, 4, head_dim, True, g)
        face_inputs = {}
        if face:  # identity embedding and two scales of ViT features of the reference face
            face_inputs = dict(id_cond=torch.randn(batch, 12, generator=g),
                               id_vit_hidden=[torch.randn(batch, 5, 8, generator=g) for _ in range(2)])
        return dict(
            hidden_states=video,
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            timestep=torch.full((batch,), 500, dtype=torch.long),
            image_rotary_emb=rope,
            return_dict=False,
            **face_inputs,
        )

    return model, inputs


CASES = [
    ModelCase("cogvideox", "CogVideoXTransformer3DModel", kind="video", pipelines=("CogVideoXPipeline",),
              notes="RoPE split with the video tokens; sin-cos positions added before the split (2B)"),
    ModelCase("consisid", "ConsisIDTransformer3DModel", kind="video", pipelines=("ConsisIDPipeline",),
              notes="face cross-attention local to each video shard; the last block's outputs gathered"),
]

REAL_CONFIGS = {
    "CogVideoX-5b": ("CogVideoXTransformer3DModel", dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
        use_rotary_positional_embeddings=True)),
    "ConsisID-preview": ("ConsisIDTransformer3DModel", dict(
        num_attention_heads=48, attention_head_dim=64, in_channels=32, out_channels=16, time_embed_dim=512,
        text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
        use_rotary_positional_embeddings=True, is_train_face=True, is_kps=False, cross_attn_interval=2,
        cross_attn_dim_head=128, cross_attn_num_heads=16, LFE_id_dim=1280, LFE_vit_dim=1024, LFE_depth=10,
        LFE_dim_head=64, LFE_num_heads=16, LFE_num_id_token=5, LFE_num_querie=32, LFE_output_dim=2048,
        LFE_ff_mult=4, LFE_num_scale=5)),
}
