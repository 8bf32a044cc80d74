"""Tiny, seeded, complete diffusers video pipelines (image-to-video and more) for whole-pipeline tests.

`build(kind, seed=0)` returns a pipeline whose every model is built from a config with seeded random weights
(tokenizers in memory, no Hub); the same arguments build the same weights, so each rank and a one-process
reference can build their own copies. `call_arguments(kind)` gives the arguments of a valid, small call (2 steps
unless overridden by the caller, tiny sizes, a deterministic conditioning image) without the generator.
`PIPELINE_CLASS[kind]` names the diffusers class, so tests can skip where the installed release lacks it.

Head counts are 4 (text encoders and transformers) so Ulysses and text-encoder TP both work on 2 ranks.
"""
from __future__ import annotations

import numpy as np
import torch

from diffpar.testing import tiny_text_encoders

PROMPT = "a red fox in snow"
TEXT_WIDTH = 32


class PipelineKinds:
    """Tiny pipeline builders by kind: `register(kind, class_name, call)` decorates a builder `fn(seed=...)`;
    `build`, `call_arguments`, `available` and `pipeline_class` as this module's functions describe them. Test
    workers with their own kinds hold one too. `has_class(name)` says whether the installed diffusers offers a
    class (by default `hasattr(diffusers, name)`)."""

    def __init__(self, has_class=None):
        self.pipeline_class: dict[str, str] = {}
        self._builders: dict = {}
        self._calls: dict = {}
        self._has_class = has_class or _diffusers_has_attribute

    def register(self, kind: str, class_name: str, call):
        def deco(fn):
            self.pipeline_class[kind] = class_name
            self._builders[kind] = fn
            self._calls[kind] = call
            return fn

        return deco

    def build(self, kind: str, seed: int = 0):
        pipe = self._builders[kind](seed=seed)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call_arguments(self, kind: str) -> dict:
        return dict(self._calls[kind]())

    def available(self, kind: str) -> bool:
        return self._has_class(self.pipeline_class[kind])


def _diffusers_has_attribute(name: str) -> bool:
    import diffusers

    return hasattr(diffusers, name)


_KINDS = PipelineKinds()
_register = _KINDS.register
PIPELINE_CLASS: dict[str, str] = _KINDS.pipeline_class
build = _KINDS.build
call_arguments = _KINDS.call_arguments
available = _KINDS.available


def conditioning_image(height: int = 32, width: int = 32, seed: int = 7):
    """A deterministic RGB PIL image (smooth gradients plus seeded noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width, y / height, (x + y) / (height + width)], axis=-1) * 200
    pixels = np.clip(base + rng.integers(0, 55, size=base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _seeded(seed: int):
    torch.manual_seed(seed)


def umt5_encoder(seed: int):
    """The tiny UMT5 encoder of the Wan pipelines (4 heads, TEXT_WIDTH wide, 2 layers)."""
    encoder, _ = tiny_text_encoders.build("umt5", seed=seed, heads=4, d_kv=8, d_model=TEXT_WIDTH, d_ff=48, layers=2)
    return encoder


def wan_vae(seed: int):
    """The tiny Wan VAE of tiny_pipelines: 16 latent channels, 8x spatial, 4x temporal compression."""
    from diffusers import AutoencoderKLWan

    _seeded(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def clip_vision_encoder(seed: int, hidden: int = 32, image_size: int = 24):
    """A tiny CLIPVisionModel (2 layers, 4 heads, 8 px patches) for the pipelines' image encoders."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tiny_text_encoders._quiet()
    _seeded(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=8, projection_dim=hidden)
    return CLIPVisionModel(config).eval()


def clip_image_processor(size: int = 24):
    """A CLIPImageProcessor resizing and cropping to `size` px (clip_vision_encoder's default image size)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def wan_parts(seed: int, image_encoder: bool = False) -> dict:
    """A Wan pipeline's components beside its transformer and scheduler: the word tokenizer, UMT5 (seed), the tiny
    Wan VAE (seed + 3) and, for image conditioning, the CLIP image processor and vision encoder (seed + 4)."""
    parts = dict(tokenizer=tiny_text_encoders.t5_tokenizer(512), text_encoder=umt5_encoder(seed),
                 vae=wan_vae(seed + 3))
    if image_encoder:
        parts.update(image_processor=clip_image_processor(), image_encoder=clip_vision_encoder(seed + 4))
    return parts


def _wan_call():
    return dict(image=conditioning_image(), prompt=PROMPT, height=32, width=32, num_frames=5, guidance_scale=1.0,
                max_sequence_length=16)


@_register("wan_i2v", "WanImageToVideoPipeline", _wan_call)
def build_wan_i2v(seed: int = 0):
    """Wan 2.1 image-to-video: UMT5, a CLIP vision encoder whose penultimate states join the prompt in every
    cross-attention (added K/V projections), and a transformer taking noise + mask + encoded first frame (36 ch).
    The CLIP tower sees 24 px (3 x 3 patches + CLS = 10 tokens), so image + prompt = 26 tokens: diffusers 0.36
    splits that context evenly over the ranks (0.37+ keeps it whole). Real Wan 2.1 I2V has 257 + 512 = 769, which
    0.36 cannot split in 2: diffpar refuses it there, naming the tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    heads, head_dim = 4, 12
    _seeded(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=36,
        out_channels=16, text_dim=TEXT_WIDTH, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=32, added_kv_proj_dim=heads * head_dim,
    ).eval()
    return WanImageToVideoPipeline(**wan_parts(seed, image_encoder=True), transformer=transformer,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def _t5(seed: int):
    """T5 v1.1 style (CogVideoX, LTX-Video): gated-gelu, 4 heads."""
    encoder, _ = tiny_text_encoders.build("t5-gated", seed=seed, heads=4, d_kv=8, d_model=TEXT_WIDTH, d_ff=48,
                                          layers=2)
    return encoder


def _cogvideox_transformer(seed: int, in_channels: int):
    """CogVideoX 1.0 5B layout: RoPE over (frames, rows, columns), no learned positional embedding, 2x2 patches."""
    from diffusers import CogVideoXTransformer3DModel

    _seeded(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=in_channels, out_channels=4, time_embed_dim=16,
        text_embed_dim=TEXT_WIDTH, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
    ).eval()


def _cogvideox_vae(seed: int):
    from diffpar.testing import tiny_vaes

    vae, _, _ = tiny_vaes.build("cogvideox", seed=seed)  # 4 latent channels, 4x spatial and temporal compression
    return vae


def _cogvideox_call():
    return dict(prompt=PROMPT, height=32, width=32, num_frames=9, guidance_scale=1.0, max_sequence_length=16)


def _cogvideox_i2v_call():
    return dict(_cogvideox_call(), image=conditioning_image())


@_register("cogvideox", "CogVideoXPipeline", _cogvideox_call)
def build_cogvideox(seed: int = 0):
    """CogVideoX text-to-video: T5, CogVideoXTransformer3DModel (joint [text, video] attention), the causal
    AutoencoderKLCogVideoX; 9 frames of 32 x 32 -> 3 latent frames of 8 x 8, 48 video + 16 text tokens."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    return CogVideoXPipeline(
        tokenizer=tiny_text_encoders.t5_tokenizer(512), text_encoder=_t5(seed), vae=_cogvideox_vae(seed + 3),
        transformer=_cogvideox_transformer(seed + 2, in_channels=4), scheduler=CogVideoXDDIMScheduler(),
    )


@_register("cogvideox_i2v", "CogVideoXImageToVideoPipeline", _cogvideox_i2v_call)
def build_cogvideox_i2v(seed: int = 0):
    """CogVideoX image-to-video: as text-to-video, the encoded first frame (sampled from the VAE posterior) padded
    with zero frames is concatenated to the noise along channels (8 input channels)."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline

    return CogVideoXImageToVideoPipeline(
        tokenizer=tiny_text_encoders.t5_tokenizer(512), text_encoder=_t5(seed), vae=_cogvideox_vae(seed + 3),
        transformer=_cogvideox_transformer(seed + 2, in_channels=8), scheduler=CogVideoXDDIMScheduler(),
    )


def _ltx_call():
    return dict(image=conditioning_image(), prompt=PROMPT, height=32, width=32, num_frames=9, guidance_scale=1.0,
                max_sequence_length=16)


@_register("ltx_i2v", "LTXImageToVideoPipeline", _ltx_call)
def build_ltx_i2v(seed: int = 0):
    """LTX-Video image-to-video: T5, LTXVideoTransformer3DModel (the first frame's tokens conditioned by a per-token
    timestep of 0), the timestep-conditioned AutoencoderKLLTXVideo of tiny_vaes (8x spatial, 2x temporal)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXImageToVideoPipeline, LTXVideoTransformer3DModel

    from diffpar.testing import tiny_vaes

    vae, _, _ = tiny_vaes.build("ltx", seed=seed + 3)
    _seeded(seed + 2)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=12,
        cross_attention_dim=48, num_layers=2, caption_channels=TEXT_WIDTH,
    ).eval()
    return LTXImageToVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_t5(seed),
        tokenizer=tiny_text_encoders.t5_tokenizer(512), transformer=transformer,
    )


def _skyreels_call():
    # Asynchronous diffusion forcing: each latent frame (causal block of 1) one step behind the previous one, so
    # the transformer gets a timestep per frame; 9 frames -> 3 latent frames of 4 x 4 (2 x 2 patches: 4 tokens each).
    return dict(prompt=PROMPT, height=32, width=32, num_frames=9, base_num_frames=9, guidance_scale=1.0,
                max_sequence_length=16, ar_step=1, causal_block_size=1)


@_register("skyreels_v2_df", "SkyReelsV2DiffusionForcingPipeline", _skyreels_call)
def build_skyreels_v2_df(seed: int = 0):
    """SkyReels-V2 diffusion forcing (text-to-video): UMT5, SkyReelsV2Transformer3DModel (Wan blocks, per-frame
    timesteps), the tiny Wan VAE, UniPC."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    _seeded(seed + 2)
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_WIDTH, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    return SkyReelsV2DiffusionForcingPipeline(
        **wan_parts(seed), transformer=transformer,
        scheduler=UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction"),
    )


def _vace_call():
    """First frame given (mask black: keep), the other 8 to generate (gray frames, mask white), one reference image
    (it adds a latent frame in front: 3 + 1 latent frames)."""
    from PIL import Image

    frames = [conditioning_image()] + [Image.new("RGB", (32, 32), (128, 128, 128))] * 8
    masks = [Image.new("L", (32, 32), 0)] + [Image.new("L", (32, 32), 255)] * 8
    return dict(prompt=PROMPT, video=frames, mask=masks, reference_images=[conditioning_image(seed=11)], height=32,
                width=32, num_frames=9, guidance_scale=1.0, max_sequence_length=16)


@_register("wan_vace", "WanVACEPipeline", _vace_call)
def build_wan_vace(seed: int = 0):
    """Wan VACE: UMT5, WanVACETransformer3DModel (VACE blocks at layers 0 and 1 add hints from the encoded
    video, mask and reference image: 16 + 16 + 64 = 96 channels), the tiny Wan VAE (it encodes the conditioning)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline, WanVACETransformer3DModel

    _seeded(seed + 2)
    transformer = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=TEXT_WIDTH, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=96,
    ).eval()
    return WanVACEPipeline(**wan_parts(seed), transformer=transformer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def _hunyuan_video15_call():
    # The quoted words reach the ByT5 glyph encoder (without quotes it is never run).
    return dict(prompt='a red fox in snow by a sign that says "day"', height=32, width=32, num_frames=5)


def _hunyuan_video15_parts(seed: int, task_type: str, **transformer_options) -> dict:
    """The components both HunyuanVideo 1.5 pipelines share: a Qwen2.5-VL language model (its third-last hidden
    states), a ByT5 glyph encoder (T5 over bytes), HunyuanVideo15Transformer3DModel for `task_type`, the tiny
    AutoencoderKLHunyuanVideo15 (4x spatial and temporal), guidance 1 (one transformer pass per step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer

    from diffpar.testing import tiny_vaes

    qwen, _ = tiny_text_encoders.build("qwen2_5_vl", seed=seed, heads=4, kv_heads=2, hidden=TEXT_WIDTH,
                                       intermediate=48, layers=3)
    byt5, _ = tiny_text_encoders.build("t5-gated", seed=seed + 1, heads=4, d_kv=8, d_model=TEXT_WIDTH, d_ff=48,
                                       layers=2, vocab=384)
    vae, _, _ = tiny_vaes.build("hunyuan_video15", seed=seed + 3)
    _seeded(seed + 2)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=TEXT_WIDTH,
        text_embed_2_dim=TEXT_WIDTH, image_embed_dim=12, rope_axes_dim=(4, 6, 6), task_type=task_type,
        **transformer_options,
    ).eval()
    return dict(text_encoder=qwen.model.language_model, tokenizer=tiny_text_encoders.chat_tokenizer(64),
                transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                text_encoder_2=byt5, tokenizer_2=ByT5Tokenizer(), guider=ClassifierFreeGuidance(guidance_scale=1.0))


def _shorten_hunyuan_video15_prompts(pipe):
    """Prompt lengths shrunk after construction: 16 MLLM tokens (no system-prompt crop), 8 ByT5 tokens."""
    pipe.system_message = "a"
    pipe.prompt_template_encode_start_idx = 0
    pipe.tokenizer_max_length = 16
    pipe.tokenizer_2_max_length = 8
    return pipe


@_register("hunyuan_video15", "HunyuanVideo15Pipeline", _hunyuan_video15_call)
def build_hunyuan_video15(seed: int = 0):
    """HunyuanVideo 1.5 text-to-video: the components of _hunyuan_video15_parts, prompts shortened, 4 (zero) image
    tokens."""
    from diffusers import HunyuanVideo15Pipeline

    pipe = _shorten_hunyuan_video15_prompts(HunyuanVideo15Pipeline(**_hunyuan_video15_parts(seed, "t2v")))
    pipe.vision_num_semantic_tokens = 4
    return pipe


class TextOnlyProcessor:
    """Stands in for a Qwen2-VL processor where a pipeline only ever passes text (images=None, videos=None)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text=None, images=None, videos=None, **kwargs):
        if images is not None or videos is not None:
            raise ValueError("TextOnlyProcessor: text only")
        return self.tokenizer(text, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)


def _kandinsky5_call():
    return dict(prompt=PROMPT, height=32, width=32, num_frames=5, guidance_scale=1.0, max_sequence_length=16)


@_register("kandinsky5_t2v", "Kandinsky5T2VPipeline", _kandinsky5_call)
def build_kandinsky5_t2v(seed: int = 0):
    """Kandinsky 5 text-to-video: Qwen2.5-VL (last hidden states; the prompt template shrunk to the bare prompt),
    CLIP (pooled), Kandinsky5Transformer3DModel (prompt blocks, then visual blocks with self- and cross-attention;
    full attention), the tiny AutoencoderKLHunyuanVideo (4x spatial and temporal)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5T2VPipeline, Kandinsky5Transformer3DModel

    from diffpar.testing import tiny_vaes

    qwen, _ = tiny_text_encoders.build("qwen2_5_vl", seed=seed, heads=4, kv_heads=2, hidden=TEXT_WIDTH,
                                       intermediate=48, layers=2)
    clip, _ = tiny_text_encoders.build("clip", seed=seed + 1, heads=4, hidden=TEXT_WIDTH, intermediate=37, layers=2,
                                       max_positions=77)
    vae, _, _ = tiny_vaes.build("hunyuan", seed=seed + 3)
    _seeded(seed + 2)
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=TEXT_WIDTH, in_text_dim2=TEXT_WIDTH, time_dim=16, out_visual_dim=4,
        patch_size=(1, 2, 2), model_dim=64, ff_dim=128, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6),
    ).eval()
    with torch.no_grad():  # modulations start at zero (the checkpoint sets them): seeded values instead
        for name, p in transformer.named_parameters():
            if "modulation" in name:
                p.copy_(torch.randn(p.shape) * 0.2)
    pipe = Kandinsky5T2VPipeline(
        transformer=transformer, vae=vae, text_encoder=qwen,
        tokenizer=TextOnlyProcessor(tiny_text_encoders.t5_tokenizer(512)), text_encoder_2=clip,
        tokenizer_2=tiny_text_encoders.clip_tokenizer(77), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
    )
    pipe.prompt_template = "{}"
    pipe.prompt_template_encode_start_idx = 0
    return pipe


def _hunyuan_video15_i2v_call():
    return dict(image=conditioning_image(), prompt='a red fox in snow by a sign that says "day"', num_frames=5)


@_register("hunyuan_video15_i2v", "HunyuanVideo15ImageToVideoPipeline", _hunyuan_video15_i2v_call)
def build_hunyuan_video15_i2v(seed: int = 0):
    """HunyuanVideo 1.5 image-to-video: the text-to-video components (target size 32 px, so a 32 px image gives
    32 x 32), plus a SigLIP vision tower (16 px: 2 x 2 patches = 4 image tokens into the joint sequence) and the
    first frame encoded by the VAE as the condition latents."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    parts = _hunyuan_video15_parts(seed, "i2v", target_size=32)
    _seeded(seed + 4)
    siglip = SiglipVisionModel(SiglipVisionConfig(hidden_size=12, intermediate_size=24, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=16, patch_size=8)).eval()
    return _shorten_hunyuan_video15_prompts(HunyuanVideo15ImageToVideoPipeline(
        **parts, image_encoder=siglip, feature_extractor=SiglipImageProcessor(size={"height": 16, "width": 16}),
    ))
