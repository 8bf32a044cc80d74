"""Tiny Kandinsky 6 transformers: the video + audio model (text branches, fused video/audio blocks) and the
super-resolution model (NABLA sparse self-attention only)."""
from __future__ import annotations

import torch

from diffpar.families.transformers.kandinsky6 import K6_SR_REFUSAL
from diffpar.testing.coverage import ModelCase
from diffpar.testing.tiny_transformers import builder, construct


def _axes(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) RoPE dims summing to `head_dim`, each even."""
    t = head_dim // 4 // 2 * 2
    h = (head_dim - t) // 2 // 2 * 2
    return t, h, head_dim - t - h


def _seeded_modulations(model) -> None:
    with torch.no_grad():  # modulation layers start near zero in checkpoints' init: seeded values make them count
        for name, p in model.named_parameters():
            if "modulation" in name:
                p.copy_(torch.randn(p.shape) * 0.2)


@builder("kandinsky6_padded")  # the same model with a right-padded prompt and its mask
@builder("kandinsky6_video_only")  # the same model called without audio (the fused blocks skip the audio path)
@builder("kandinsky6")
def _kandinsky6(heads=2, head_dim=16, text_layers=1, layers=2, audio=6, padded=False):
    from diffusers import Kandinsky6Transformer3DModel

    model = construct(
        Kandinsky6Transformer3DModel,
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, patch_size=(1, 2, 2),
        model_dim=heads * head_dim, ff_dim=2 * heads * head_dim, num_text_blocks=text_layers,
        num_visual_blocks=layers, axes_dims=_axes(head_dim), visual_cond=True, in_audio_dim=4, out_audio_dim=4,
        # As the released checkpoints: RoPE in the cross-modal attentions, cross-modal gates, fixed modulation.
        ca_rope=True, cross_gates=True, fix_modulation=True,
    )
    _seeded_modulations(model)

    default_audio, default_padded = audio, padded

    def inputs(seq=16, text=8, batch=1, seed=1, audio=default_audio, padded=default_padded):
        # One latent frame of 2 x 2*seq pixels, channels last (noisy latent, condition, mask): seq video tokens with
        # 1x2x2 patches; `audio` audio latent frames (0: video only).
        g = torch.Generator().manual_seed(seed)
        kwargs = dict(
            hidden_states=torch.randn(batch, 1, 2, 2 * seq, 9, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
            pooled_projections=torch.randn(batch, 8, generator=g),
            timestep=torch.full((batch,), 500.0),
            return_dict=True,
        )
        if audio:
            kwargs["audio_hidden_states"] = torch.randn(batch, audio, 4, generator=g)
        if padded:  # the last quarter of the prompt is padding (the prompt attentions run whole, with the mask)
            mask = torch.ones(batch, text, dtype=torch.bool)
            mask[:, text - max(1, text // 4):] = False
            kwargs["encoder_attention_mask"] = mask
        return kwargs

    return model, inputs


@builder("kandinsky6_sr_refused")  # the same model, for the refusal case
@builder("kandinsky6_sr")
def _kandinsky6_sr(heads=2, head_dim=16, layers=2):
    from diffusers import Kandinsky6SRTransformer3DModel

    model = construct(
        Kandinsky6SRTransformer3DModel,
        in_visual_dim=4, out_visual_dim=8, time_dim=16, patch_size=(1, 1, 1), model_dim=heads * head_dim,
        ff_dim=2 * heads * head_dim, num_visual_blocks=layers, axes_dims=_axes(head_dim), nabla_window=(3, 3, 3),
    )
    _seeded_modulations(model)

    def inputs(seq=16, text=8, batch=1, seed=1):
        # NABLA needs a token grid of 8 x 8 blocks: 2 frames of 8 x 16 tokens (4 blocks of 64); `seq` and `text` do
        # not apply (the model takes no prompt, and its grid is fixed by the block size).
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 2, 8, 16, 9, generator=g), timestep=torch.full((batch,), 500.0),
                    return_dict=True)

    return model, inputs


CASES = [
    ModelCase("kandinsky6", "Kandinsky6Transformer3DModel", kind="video",
              notes="audio and prompts whole on every rank: prompt/audio attentions local, audio-to-video gathers "
                    "the video keys"),
    ModelCase("kandinsky6_video_only", "Kandinsky6Transformer3DModel", kind="video",
              cp=("w2-ulysses", "w4-ring-anything-odd"), tp=("w2-tp",), model_kwargs={"heads": 4, "audio": 0},
              notes="called without audio"),
    ModelCase("kandinsky6_padded", "Kandinsky6Transformer3DModel", kind="video",
              cp=("w2-ulysses", "w2-ring", "w4-ring-anything-odd"), tp=("w2-tp",),
              model_kwargs={"heads": 4, "padded": True}, notes="padded prompt mask (prompt attentions are local)"),
    ModelCase("kandinsky6_sr", "Kandinsky6SRTransformer3DModel", kind="video", cp=(), tp=("w2-tp", "w4-tp"),
              notes="TP only: context parallelism refused (see kandinsky6_sr_refused)"),
    ModelCase("kandinsky6_sr_refused", "Kandinsky6SRTransformer3DModel", kind="video", cp=(), tp=(),
              refused=K6_SR_REFUSAL),
]

REAL_CONFIGS = {
    # The class defaults (the released size), with the released flags.
    "Kandinsky-6": ("Kandinsky6Transformer3DModel", dict(
        in_visual_dim=16, out_visual_dim=16, in_text_dim=3584, in_text_dim2=768, time_dim=1024, patch_size=(1, 2, 2),
        model_dim=4096, ff_dim=16384, num_text_blocks=4, num_visual_blocks=60, axes_dims=(32, 48, 48),
        visual_cond=True, ca_rope=True, cross_gates=True, fix_modulation=True)),
    "Kandinsky-6-SR": ("Kandinsky6SRTransformer3DModel", dict(
        in_visual_dim=64, out_visual_dim=640, time_dim=512, patch_size=(1, 1, 1), model_dim=1792, ff_dim=7168,
        num_visual_blocks=32, axes_dims=(16, 24, 24))),
}
