"""Tiny seeded transformers and their inputs, for tests, benchmarks and the demo.

`build(name, **overrides)` returns (model, inputs) where `inputs(seq=..., batch=...)` makes forward kwargs.
Shapes mirror the real models (joint text + image streams, RoPE ids, GQA where the family has it), sized to
run in milliseconds on one CPU core. Sequence lengths are parameters so tests can make them odd.
"""
from __future__ import annotations

from typing import Callable

import torch

BUILDERS: dict[str, Callable] = {}


def builder(name):
    def deco(fn):
        BUILDERS[name] = fn
        return fn

    return deco


def build(name: str, seed: int = 0, **overrides):
    if name not in BUILDERS:  # families added through the coverage harness register on import
        from diffpar.testing.coverage import load_family_builders

        load_family_builders()
    torch.manual_seed(seed)
    model, make_inputs = BUILDERS[name](**overrides)
    model.eval()
    return model, make_inputs


def prompt_mask(batch: int, text: int, text_padding: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A (batch, text) prompt mask whose last `text_padding` tokens are padding, as a tokenizer padding to a fixed
    length gives."""
    mask = torch.ones(batch, text, dtype=dtype)
    if text_padding:
        mask[:, text - text_padding:] = 0
    return mask


def construct(cls, **kwargs):
    """Build `cls` with the arguments this diffusers release accepts (constructors gain options over releases)."""
    import inspect

    accepted = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in kwargs.items() if k in accepted})


def _if_accepted(fn, **kwargs):
    import inspect

    accepted = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in accepted}


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Three even RoPE axes that sum to head_dim, shaped like Flux's (16, 56, 56) for 128."""
    first = max(2, (head_dim // 8) // 2 * 2)
    second = (head_dim - first) // 2 // 2 * 2
    return first, second, head_dim - first - second


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@builder("flux")
def _flux(heads=2, head_dim=16, layers=1, single_layers=1):
    from diffusers import FluxTransformer2DModel

    model = construct(
        FluxTransformer2DModel,
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=rope_axes(head_dim),
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            pooled_projections=torch.randn(batch, 32, generator=g),
            timestep=torch.full((batch,), 0.5),
            img_ids=torch.randn(seq, 3, generator=g),
            txt_ids=torch.zeros(text, 3),
            return_dict=False,
        )

    return model, inputs


@builder("flux2")
def _flux2(heads=2, head_dim=16, layers=1, single_layers=1):
    from diffusers import Flux2Transformer2DModel

    model = construct(
        Flux2Transformer2DModel,
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32,
        timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True,
    )

    def inputs(seq=16, text=8, batch=1, seed=1):
        g = _gen(seed)
        return dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            timestep=torch.full((batch,), 0.5),
            img_ids=torch.randn(batch, seq, 4, generator=g),
            txt_ids=torch.zeros(batch, text, 4),
            guidance=torch.full((batch,), 3.5),
            return_dict=False,
        )

    return model, inputs


@builder("qwenimage")
def _qwenimage(heads=2, head_dim=16, layers=2):
    from diffusers import QwenImageTransformer2DModel

    model = construct(
        QwenImageTransformer2DModel,
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, axes_dims_rope=(4, 6, 6),
    )

    def inputs(seq=16, text=8, batch=1, seed=1, text_padding=0):
        # QwenImage derives RoPE from img_shapes: seq = frames * h * w with h = 1 keeps seq arbitrary.
        # text_padding masks out the last tokens of the prompt, as a tokenizer padding to max length does.
        g = _gen(seed)
        mask = prompt_mask(batch, text, text_padding, dtype=torch.long)
        return dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            encoder_hidden_states_mask=mask,
            timestep=torch.full((batch,), 0.5),
            img_shapes=[[(1, 1, seq)]] * batch,
            return_dict=False,
            **_if_accepted(model.forward, txt_seq_lens=[text] * batch),  # 0.36-0.38 take lengths, not a mask
        )

    return model, inputs


@builder("wan")
def _wan(heads=2, head_dim=16, layers=2):
    from diffusers import WanTransformer3DModel

    model = construct(
        WanTransformer3DModel,
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, rope_max_seq_len=64,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, frames=2):
        # seq image tokens = frames * (H/2) * (W/2); choose H = 2, W = 2 * (seq // frames).
        g = _gen(seed)
        width = 2 * max(1, seq // frames)
        return dict(
            hidden_states=torch.randn(batch, 4, frames, 2, width, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            return_dict=False,
        )

    return model, inputs


@builder("zimage")
def _zimage(heads=2, head_dim=16, layers=2, refiner_layers=1, omni=False):
    from diffusers import ZImageTransformer2DModel

    # head_dim must equal sum(axes_dims); a 3-axis RoPE like the real (32, 48, 48) one.
    axes = (4, 6, 6) if head_dim == 16 else (head_dim // 4, head_dim // 4, head_dim - 2 * (head_dim // 4))
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=heads * head_dim, n_layers=layers,
        n_refiner_layers=refiner_layers, n_heads=heads, n_kv_heads=heads, cap_feat_dim=32, axes_dims=list(axes),
        axes_lens=[256, 64, 64], **({"siglip_feat_dim": 24} if omni else {}),
    )
    # Pad tokens are created uninitialized (torch.empty) up to 0.38: give every one, omni's SigLIP one included,
    # seeded values, or each rank pads with whatever memory it got.
    with torch.no_grad():
        for name in ("x_pad_token", "cap_pad_token", "siglip_pad_token"):
            token = getattr(model, name, None)
            if token is not None:
                token.copy_(torch.randn(token.shape))

    def inputs(seq=16, text=8, batch=1, seed=1, sizes=None, texts=None):
        # Per-sample lists, as the pipeline passes them. Image tokens = (H/2) * (W/2) with H = 2: W = 2 * seq.
        # `sizes` / `texts` give per-sample token counts (different lengths make the padding mask appear).
        g = _gen(seed)
        sizes = sizes or [seq] * batch
        texts = texts or [text] * batch
        if omni:
            # Omni mode: per sample, a clean condition image (with SigLIP features) and the noisy target image,
            # one caption each; the noise mask marks which image is noisy.
            return dict(
                x=[[torch.randn(4, 1, 2, 2 * n, generator=g), torch.randn(4, 1, 2, 2 * n, generator=g)] for n in sizes],
                t=torch.full((len(sizes),), 0.5),
                cap_feats=[[torch.randn(n, 32, generator=g), torch.randn(n + 3, 32, generator=g)] for n in texts],
                siglip_feats=[[torch.randn(2, 3, 24, generator=g), None] for _ in sizes],
                image_noise_mask=[[0, 1] for _ in sizes],
                return_dict=False,
            )
        return dict(
            x=[torch.randn(4, 1, 2, 2 * n, generator=g) for n in sizes],
            t=torch.full((len(sizes),), 0.5),
            cap_feats=[torch.randn(n, 32, generator=g) for n in texts],
            return_dict=False,
        )

    return model, inputs


@builder("sd3")
def _sd3(heads=2, head_dim=16, layers=2, dual_layers=(0,)):
    from diffusers import SD3Transformer2DModel

    # SD3.5-shaped: RMS qk-norm and a dual (image-only) attention in the first block; the last block is
    # context-pre-only, as in every SD3.
    model = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=32, pos_embed_max_size=16, dual_attention_layers=tuple(dual_layers), qk_norm="rms_norm",
    )

    def inputs(seq=16, text=8, batch=1, seed=1, height=None):
        # Image tokens = (H/2) * (W/2): H = 2 * height, W = 2 * (seq // height); height 1 keeps seq arbitrary.
        g = _gen(seed)
        height = height or 1
        return dict(
            hidden_states=torch.randn(batch, 4, 2 * height, 2 * (seq // height), generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            pooled_projections=torch.randn(batch, 32, generator=g),
            timestep=torch.full((batch,), 500.0),
            return_dict=False,
        )

    return model, inputs


@builder("hunyuan_video")
def _hunyuan_video(heads=2, head_dim=16, layers=1, single_layers=1, refiner_layers=1, image_condition_type=None):
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=layers,
        num_single_layers=single_layers, num_refiner_layers=refiner_layers, patch_size=2, patch_size_t=1,
        text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6) if head_dim == 16 else
        (head_dim // 4, head_dim // 4, head_dim - 2 * (head_dim // 4)), guidance_embeds=True,
        image_condition_type=image_condition_type,
    )

    def inputs(seq=16, text=8, batch=1, seed=1, frames=2, valid=None, padding="right"):
        # Video tokens = frames * (H/2) * (W/2) with H = 2: W = 2 * (seq // frames). `valid` gives each row's
        # count of real text tokens, padded on the right as the pipeline's tokenizer does (or on the left, to
        # test masks that cannot be cut off); default: no padding.
        g = _gen(seed)
        width = 2 * max(1, seq // frames)
        valid = valid or [text] * batch
        mask = torch.zeros(batch, text, dtype=torch.long)
        for row, n in enumerate(valid):
            if padding == "right":
                mask[row, :n] = 1
            else:
                mask[row, text - n:] = 1
        return dict(
            hidden_states=torch.randn(batch, 4, frames, 2, width, generator=g),
            timestep=torch.full((batch,), 500.0),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            encoder_attention_mask=mask,
            pooled_projections=torch.randn(batch, 32, generator=g),
            guidance=torch.full((batch,), 6000.0),
            return_dict=False,
        )

    return model, inputs
