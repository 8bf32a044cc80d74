"""Tiny seeded ControlNets with their transformers, and one denoising step called the way the pipelines call it.

`build_pair(family, **overrides)` returns a `ControlNetPair`: `.transformer`, `.controlnet` and
`.inputs(seq=..., text=..., batch=..., seed=...)` -> (controlnet kwargs, transformer kwargs). `pair.step(cn_kwargs,
tf_kwargs)` runs the ControlNet, hands its residuals to the transformer and returns the transformer's output,
exactly as FluxControlNetPipeline / QwenImageControlNetPipeline / StableDiffusion3ControlNetPipeline /
ZImageControlNetPipeline do inside their denoising loop.

ControlNets are zero-initialised where they feed the transformer (`controlnet_blocks`, `controlnet_x_embedder`);
here every weight is re-drawn, so the residuals are not zero and a wrong split shows.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from diffpar.testing.tiny_pipelines import tiny_image_vae

PAIR_BUILDERS: dict[str, Callable] = {}


def pair_builder(name):
    def deco(fn):
        PAIR_BUILDERS[name] = fn
        return fn

    return deco


@dataclass
class ControlNetPair:
    transformer: torch.nn.Module
    controlnet: torch.nn.Module
    inputs: Callable
    step: Callable  # (transformer, controlnet, cn_kwargs, tf_kwargs) -> output tensor

    def run(self, cn_kwargs, tf_kwargs, transformer=None, controlnet=None):
        return self.step(transformer or self.transformer, controlnet or self.controlnet, cn_kwargs, tf_kwargs)


def build_pair(family: str, seed: int = 0, **overrides) -> ControlNetPair:
    torch.manual_seed(seed)
    pair = PAIR_BUILDERS[family](**overrides)
    pair.transformer.eval()
    pair.controlnet.eval()
    return pair


def _redraw(module: torch.nn.Module, scale: float = 0.05, seed: int = 1234) -> None:
    """Replace zero-initialised ControlNet weights by seeded random ones (norm weights stay 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                continue
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------
# Flux
# ------------------------------------------------------------------------------------------------------------


@pair_builder("flux")
def _flux(heads=2, head_dim=16, layers=2, single_layers=2, cn_layers=1, cn_single_layers=1, union=False,
          nets=1, multi=False, hint=False):
    """`nets` ControlNets (`multi=True` wraps them in FluxMultiControlNetModel); `union`: mode embeddings;
    `hint`: an image-space condition through `input_hint_block` instead of packed latents."""
    from diffusers import FluxControlNetModel, FluxMultiControlNetModel, FluxTransformer2DModel

    common = dict(patch_size=1, in_channels=16, attention_head_dim=head_dim, num_attention_heads=heads,
                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    transformer = FluxTransformer2DModel(num_layers=layers, num_single_layers=single_layers, **common)
    controlnets = []
    for i in range(nets):
        cn = FluxControlNetModel(num_layers=cn_layers, num_single_layers=cn_single_layers,
                                 num_mode=4 if union else None,
                                 conditioning_embedding_channels=16 if hint else None, **common)
        _redraw(cn, seed=100 + i)
        controlnets.append(cn)
    controlnet = FluxMultiControlNetModel(controlnets) if (multi or nets > 1) else controlnets[0]
    is_multi = isinstance(controlnet, FluxMultiControlNetModel)

    def inputs(seq=16, text=8, batch=1, seed=1, width=None):
        g = _gen(seed)
        if hint:
            # image-space condition: 8x the latent grid; seq = (H/8) * (W/8)
            width = width or seq
            height = seq // width
            conds = [torch.randn(batch, 3, 8 * height, 8 * width, generator=g) for _ in range(nets)]
        else:
            conds = [torch.randn(batch, seq, 16, generator=g) for _ in range(nets)]
        modes = [torch.full((batch,), i % 4, dtype=torch.long) for i in range(nets)]
        shared = dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            pooled_projections=torch.randn(batch, 32, generator=g),
            timestep=torch.full((batch,), 0.5),
            img_ids=torch.randn(seq, 3, generator=g),
            txt_ids=torch.randn(text, 3, generator=g),
        )
        if is_multi:
            cn = dict(shared, controlnet_cond=conds, controlnet_mode=modes, conditioning_scale=[0.8 - 0.2 * i for i in range(nets)], return_dict=False)
        else:
            cn = dict(shared, controlnet_cond=conds[0], controlnet_mode=modes[0][:, None] if union else None,
                      conditioning_scale=0.8, return_dict=False)
        return cn, dict(shared, return_dict=False)

    def step(transformer, controlnet, cn_kwargs, tf_kwargs):
        block_samples, single_block_samples = controlnet(**cn_kwargs)
        return transformer(**tf_kwargs, controlnet_block_samples=block_samples,
                           controlnet_single_block_samples=single_block_samples)[0]

    return ControlNetPair(transformer, controlnet, inputs, step)


# ------------------------------------------------------------------------------------------------------------
# QwenImage
# ------------------------------------------------------------------------------------------------------------


@pair_builder("qwenimage")
def _qwenimage(heads=2, head_dim=16, layers=2, cn_layers=1, multi=False):
    from diffusers import QwenImageControlNetModel, QwenImageMultiControlNetModel, QwenImageTransformer2DModel

    common = dict(patch_size=2, in_channels=16, out_channels=4, attention_head_dim=head_dim,
                  num_attention_heads=heads, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    transformer = QwenImageTransformer2DModel(num_layers=layers, **common)
    cn = QwenImageControlNetModel(num_layers=cn_layers, **common)
    _redraw(cn, seed=200)
    controlnet = QwenImageMultiControlNetModel([cn]) if multi else cn

    def inputs(seq=16, text=8, batch=1, seed=1, masked_text=0):
        g = _gen(seed)
        mask = torch.ones(batch, text, dtype=torch.long)
        if masked_text:
            mask[:, text - masked_text:] = 0  # padded prompt tail
        shared = dict(
            hidden_states=torch.randn(batch, seq, 16, generator=g),
            encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
            encoder_hidden_states_mask=mask,
            timestep=torch.full((batch,), 0.5),
            img_shapes=[[(1, 1, seq)]] * batch,
        )
        if "txt_seq_lens" in inspect.signature(type(transformer).forward).parameters:
            shared["txt_seq_lens"] = [text] * batch  # 0.36-0.38 take the prompt length (RoPE rows) too
        cond = torch.randn(batch, seq, 16, generator=g)
        if multi:
            cn_kwargs = dict(shared, controlnet_cond=[cond, torch.randn(batch, seq, 16, generator=g)],
                             conditioning_scale=[0.8, 0.5], return_dict=False)
        else:
            cn_kwargs = dict(shared, controlnet_cond=cond, conditioning_scale=0.8, return_dict=False)
        return cn_kwargs, dict(shared, return_dict=False)

    def step(transformer, controlnet, cn_kwargs, tf_kwargs):
        block_samples = controlnet(**cn_kwargs)
        return transformer(**tf_kwargs, controlnet_block_samples=block_samples)[0]

    return ControlNetPair(transformer, controlnet, inputs, step)


# ------------------------------------------------------------------------------------------------------------
# Whole pipelines
# ------------------------------------------------------------------------------------------------------------
#
# `build_pipeline(family, **overrides)` -> (pipeline, call_kwargs(**overrides)). The pipeline is the real diffusers
# ControlNet pipeline class with its real scheduler and a tiny VAE; Flux also has real (tiny) CLIP and T5 encoders
# and tokenizers. The other families are given prompt embeddings directly (their text encoders - Qwen2.5-VL,
# CLIP x2 + T5, Qwen3 - are not what these tests are about), which is what the pipelines do with `prompt_embeds`.

PIPELINE_BUILDERS: dict[str, Callable] = {}


def pipeline_builder(name):
    def deco(fn):
        PIPELINE_BUILDERS[name] = fn
        return fn

    return deco


def build_pipeline(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return PIPELINE_BUILDERS[family](seed=seed, **overrides)


def _image(batch, height, width, seed):
    g = _gen(seed)
    return torch.rand(batch, 3, height, width, generator=g)


@pipeline_builder("flux")
def _flux_pipeline(seed=0, heads=4, nets=1, union=False, cn_layers=1, cn_single_layers=1):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel

    from diffpar.testing.tiny_pipelines import build_tiny_flux_pipeline

    base = build_tiny_flux_pipeline(seed=seed, heads=heads)
    transformer = base.transformer
    controlnets = []
    for i in range(nets):
        torch.manual_seed(seed + 10 + i)
        cn = FluxControlNetModel.from_transformer(
            transformer, num_layers=cn_layers, num_single_layers=cn_single_layers,
            attention_head_dim=transformer.config.attention_head_dim, num_attention_heads=heads,
        )
        if union:
            cn = FluxControlNetModel.from_config({**cn.config, "num_mode": 4})
        _redraw(cn, seed=300 + i)
        controlnets.append(cn.eval())
    controlnet = controlnets[0] if nets == 1 else FluxMultiControlNetModel(controlnets)
    pipe = FluxControlNetPipeline(
        scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, transformer=transformer,
        controlnet=controlnet,
    )

    def call_kwargs(height=32, width=32, steps=2, batch=1, seed=7):
        images = [_image(batch, height, width, seed + i) for i in range(nets)]
        kwargs = dict(
            prompt=["a tiny test prompt"] * batch, height=height, width=width, num_inference_steps=steps,
            guidance_scale=3.5, max_sequence_length=16, output_type="latent",
            control_image=images[0] if nets == 1 else images,
            controlnet_conditioning_scale=0.8 if nets == 1 else [0.8 - 0.2 * i for i in range(nets)],
            generator=torch.Generator().manual_seed(seed),
        )
        if union:
            kwargs["control_mode"] = 2 if nets == 1 else [i % 4 for i in range(nets)]
        return kwargs

    return pipe, call_kwargs


@pipeline_builder("qwenimage")
def _qwenimage_pipeline(seed=0, heads=4, multi=False, cn_layers=1):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageControlNetPipeline, QwenImageMultiControlNetModel

    from . import tiny_vaes

    pair = build_pair("qwenimage", seed=seed, heads=heads, cn_layers=cn_layers)
    vae, _, _ = tiny_vaes.build("qwen", seed=seed + 3, temporal=(False, False))
    controlnet = QwenImageMultiControlNetModel([pair.controlnet]) if multi else pair.controlnet
    pipe = QwenImageControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None, tokenizer=None,
        transformer=pair.transformer, controlnet=controlnet,
    )

    takes_lengths = "txt_seq_lens" in inspect.signature(type(pair.transformer).forward).parameters

    def call_kwargs(height=32, width=32, steps=2, batch=1, seed=7, text=8, masked_text=0):
        g = _gen(seed)
        if takes_lengths:
            masked_text = 0  # 0.36-0.38 pipelines expect prompt embeddings cut to the longest prompt: no padding
        mask = torch.ones(batch, text, dtype=torch.long)
        if masked_text:
            mask[:, text - masked_text:] = 0
        image = _image(batch, height, width, seed + 1)
        return dict(
            prompt_embeds=torch.randn(batch, text, 32, generator=g), prompt_embeds_mask=mask,
            height=height, width=width, num_inference_steps=steps, output_type="latent",
            control_image=[image, _image(batch, height, width, seed + 2)] if multi else image,
            controlnet_conditioning_scale=[0.8, 0.5] if multi else 0.8,
            generator=torch.Generator().manual_seed(seed),
        )

    return pipe, call_kwargs


# ------------------------------------------------------------------------------------------------------------
# SD3
# ------------------------------------------------------------------------------------------------------------


@pair_builder("sd3")
def _sd3(heads=2, head_dim=16, layers=2, cn_layers=1, nets=1, no_prompt_stream=False):
    """`no_prompt_stream`: an SD3.5-large-style ControlNet (no context_embedder: image-only blocks)."""
    from diffusers import SD3ControlNetModel, SD3MultiControlNetModel

    from . import tiny_transformers

    transformer, _ = tiny_transformers.build("sd3", heads=heads, head_dim=head_dim, layers=layers)
    controlnets = []
    for i in range(nets):
        cn = SD3ControlNetModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=cn_layers,
            attention_head_dim=head_dim, num_attention_heads=heads,
            joint_attention_dim=None if no_prompt_stream else 32, caption_projection_dim=heads * head_dim,
            pooled_projection_dim=32, pos_embed_max_size=16, qk_norm="rms_norm",
        )
        _redraw(cn, seed=400 + i)
        controlnets.append(cn)
    controlnet = SD3MultiControlNetModel(controlnets) if nets > 1 else controlnets[0]

    def inputs(seq=16, text=8, batch=1, seed=1, height=None):
        # Image tokens = (H/2) * (W/2): H = 2 * height, W = 2 * (seq // height).
        g = _gen(seed)
        height = height or 1
        latent = (batch, 4, 2 * height, 2 * (seq // height))
        shared = dict(hidden_states=torch.randn(*latent, generator=g), timestep=torch.full((batch,), 500.0),
                      pooled_projections=torch.randn(batch, 32, generator=g))
        prompt = torch.randn(batch, text, 32, generator=g)
        conds = [torch.randn(*latent, generator=g) for _ in range(nets)]
        cn = dict(shared, encoder_hidden_states=None if no_prompt_stream else prompt, return_dict=False,
                  controlnet_cond=conds if nets > 1 else conds[0],
                  conditioning_scale=[0.8 - 0.2 * i for i in range(nets)] if nets > 1 else 0.8)
        return cn, dict(shared, encoder_hidden_states=prompt, return_dict=False)

    def step(transformer, controlnet, cn_kwargs, tf_kwargs):
        block_samples = controlnet(**cn_kwargs)[0]
        return transformer(**tf_kwargs, block_controlnet_hidden_states=block_samples)[0]

    return ControlNetPair(transformer, controlnet, inputs, step)


@pipeline_builder("sd3")
def _sd3_pipeline(seed=0, heads=4, nets=1, cn_layers=1):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3ControlNetPipeline

    pair = build_pair("sd3", seed=seed, heads=heads, cn_layers=cn_layers, nets=nets)
    vae = tiny_image_vae(seed + 3, shift_factor=0.0609, scaling_factor=1.5305)
    pipe = StableDiffusion3ControlNetPipeline(
        transformer=pair.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None, controlnet=pair.controlnet,
    )

    def call_kwargs(height=32, width=32, steps=2, batch=1, seed=7, text=8, guidance_scale=4.0):
        g = _gen(seed)
        images = [_image(batch, height, width, seed + 1 + i) for i in range(nets)]
        return dict(
            prompt_embeds=torch.randn(batch, text, 32, generator=g),
            pooled_prompt_embeds=torch.randn(batch, 32, generator=g),
            negative_prompt_embeds=torch.randn(batch, text, 32, generator=g),
            negative_pooled_prompt_embeds=torch.randn(batch, 32, generator=g),
            height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
            control_image=images[0] if nets == 1 else images,
            controlnet_conditioning_scale=0.8 if nets == 1 else [0.8 - 0.2 * i for i in range(nets)],
            generator=torch.Generator().manual_seed(seed),
        )

    return pipe, call_kwargs


# ------------------------------------------------------------------------------------------------------------
# Z-Image
# ------------------------------------------------------------------------------------------------------------


@pair_builder("zimage")
def _zimage(heads=2, head_dim=16, layers=4, refiner_layers=2, mode=None, control_in_dim=4):
    """A Z-Image-Turbo-Fun-Controlnet-Union-style ControlNet sharing the transformer's embedders and refiners.

    `mode`: None (Union 1.0: own refiners after the caption), "control_layers" (2.0: the control layers first
    refine the image stream and their hints enter the shared noise refiner), "control_noise_refiner" (2.1: own
    control refiner blocks produce those hints). `control_in_dim` > 4: extra zero channels, as 2.0 pipelines pad.
    """
    from diffusers import ZImageControlNetModel

    from . import tiny_transformers

    transformer, make_inputs = tiny_transformers.build("zimage", heads=heads, head_dim=head_dim, layers=layers,
                                                       refiner_layers=refiner_layers)
    cn = ZImageControlNetModel(
        control_layers_places=[0, 2], control_refiner_layers_places=list(range(refiner_layers)) if mode else None,
        control_in_dim=control_in_dim, add_control_noise_refiner=mode, all_patch_size=(2,), all_f_patch_size=(1,),
        dim=heads * head_dim, n_refiner_layers=refiner_layers, n_heads=heads, n_kv_heads=heads, qk_norm=True,
    )
    _redraw(cn, seed=500)
    controlnet = ZImageControlNetModel.from_transformer(cn, transformer)

    def inputs(seq=16, text=8, batch=1, seed=1, sizes=None, texts=None):
        tf = make_inputs(seq=seq, text=text, batch=batch, seed=seed, sizes=sizes, texts=texts)
        g = _gen(seed + 1)
        height, width = tf["x"][0].shape[-2:]
        # the pipeline passes one 5-D tensor (B, C, 1, H, W); uneven `sizes` need the list form
        control = [torch.randn(control_in_dim, 1, x.shape[-2], x.shape[-1], generator=g) for x in tf["x"]]
        control = torch.stack(control) if len({c.shape for c in control}) == 1 else control
        cn_kwargs = dict(x=tf["x"], t=tf["t"], cap_feats=tf["cap_feats"], control_context=control,
                         conditioning_scale=0.8)
        return cn_kwargs, tf

    def step(transformer, controlnet, cn_kwargs, tf_kwargs):
        samples = controlnet(**cn_kwargs)
        out = transformer(**tf_kwargs, controlnet_block_samples=samples)[0]
        return torch.cat([o.flatten() for o in out])  # per-sample outputs, one tensor for comparison

    return ControlNetPair(transformer, controlnet, inputs, step)


@pipeline_builder("zimage")
def _zimage_pipeline(seed=0, heads=4, head_dim=16, mode=None, text_encoder=False):
    """text_encoder=True adds a tiny Qwen3 (hidden 32 = the transformer's caption width) and a chat tokenizer, so
    the pipeline encodes prompts itself; otherwise call_kwargs passes prompt embeddings."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageControlNetPipeline

    from . import tiny_text_encoders

    pair = build_pair("zimage", seed=seed, heads=heads, head_dim=head_dim, mode=mode)
    vae = tiny_image_vae(seed + 3, shift_factor=0.1159, scaling_factor=0.3611)
    encoder, tokenizer = None, None
    if text_encoder:
        encoder, _ = tiny_text_encoders.build("qwen3", seed=seed + 5, heads=4, kv_heads=2, head_dim=8, hidden=32,
                                              intermediate=48, layers=2)
        tokenizer = tiny_text_encoders.chat_tokenizer(32)
    pipe = ZImageControlNetPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=encoder, tokenizer=tokenizer, transformer=pair.transformer,
                                    controlnet=pair.controlnet)

    def call_kwargs(height=32, width=32, steps=2, batch=1, seed=7, text=8, negative_text=5, guidance_scale=3.0):
        g = _gen(seed)
        return dict(
            prompt_embeds=[torch.randn(text, 32, generator=g) for _ in range(batch)],
            negative_prompt_embeds=[torch.randn(negative_text, 32, generator=g) for _ in range(batch)],
            height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
            control_image=_image(batch, height, width, seed + 1), controlnet_conditioning_scale=0.8,
            generator=torch.Generator().manual_seed(seed),
        )

    return pipe, call_kwargs
