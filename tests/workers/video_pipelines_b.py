"""Rank-side whole video pipelines, second set (tests/test_video_pipelines_b.py): LTX-2 (image-to-video and
text-to-video with audio), HunyuanVideo, ChronoEdit, Helios, Wan Animate. The tiny builders live here (seeded
weights, in-memory tokenizers, no Hub; the Wan parts are tiny_video_pipelines' own), and `video_equivalence` compares
a parallel run with one process as workers.video_pipelines does."""
from __future__ import annotations

import torch
import torch.distributed as dist

from diffpar.testing import tiny_text_encoders, tiny_video_pipelines
from diffpar.testing.tiny_video_pipelines import conditioning_image
from workers.end_to_end import against_one_process, split_calls

# An odd prompt length (max_sequence_length): the transformers keep the prompt whole or split it unevenly.
PROMPT_TOKENS = 15


def _diffusers_has(name: str) -> bool:
    from availability import diffusers_has

    return diffusers_has(name)


# this module's kinds, registered and built as tiny_video_pipelines' own; a class whose module fails to import on
# this release counts as absent (tests/availability.py)
_KINDS = tiny_video_pipelines.PipelineKinds(has_class=_diffusers_has)
PIPELINE_CLASS = _KINDS.pipeline_class
build = _KINDS.build
call_arguments = _KINDS.call_arguments
available = _KINDS.available


def _ltx2_components(seed: int) -> dict:
    """LTX-2's components: Gemma 3 (every layer's hidden states, stacked), the text connectors, the audio-video
    LTX2VideoTransformer3DModel, the tiny LTX-2 video VAE of tiny_vaes (8x spatial and temporal: 9 frames of
    32 x 32 -> 2 latent frames of 4 x 4), a tiny audio VAE and vocoder."""
    from diffusers import AutoencoderKLLTX2Audio, FlowMatchEulerDiscreteScheduler, LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    from diffpar.testing import tiny_vaes

    layers = 2
    gemma, _ = tiny_text_encoders.build("gemma3-multimodal", seed=seed, heads=4, kv_heads=2, head_dim=8,
                                        hidden=tiny_video_pipelines.TEXT_WIDTH, intermediate=48, layers=layers)
    vae, _, _ = tiny_vaes.build("ltx2", seed=seed + 3)
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    # The config's defaults say 16x: this tiny VAE compresses 8x both ways (what the pipeline sizes latents by).
    vae.spatial_compression_ratio = vae.temporal_compression_ratio = 8
    torch.manual_seed(seed + 2)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=tiny_video_pipelines.TEXT_WIDTH, rope_double_precision=False, rope_type="split",
    ).eval()
    torch.manual_seed(seed + 4)
    connectors = LTX2TextConnectors(
        caption_channels=tiny_video_pipelines.TEXT_WIDTH, text_proj_in_factor=layers + 1,
        video_connector_num_attention_heads=4, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split",
    ).eval()
    torch.manual_seed(seed + 5)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ).eval()
    torch.manual_seed(seed + 6)
    vocoder = LTX2Vocoder(
        in_channels=2 * 8, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    ).eval()
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae, text_encoder=gemma,
                tokenizer=tiny_text_encoders.t5_tokenizer(512), connectors=connectors, transformer=transformer,
                vocoder=vocoder)


def _ltx2_call():
    return dict(prompt=tiny_video_pipelines.PROMPT, height=32, width=32, num_frames=9, frame_rate=25.0,
                guidance_scale=1.0, max_sequence_length=PROMPT_TOKENS)


@_KINDS.register("ltx2", "LTX2Pipeline", _ltx2_call)
def build_ltx2(seed: int = 0):
    """LTX-2 text-to-video (with audio): the components of _ltx2_components."""
    from diffusers import LTX2Pipeline

    return LTX2Pipeline(**_ltx2_components(seed))


def _ltx2_i2v_call():
    # image_crf=0: no H.264 re-compression of the image (PyAV is not a dependency); releases before the argument
    # (0.38 and older) do not re-compress.
    import inspect

    from diffusers import LTX2ImageToVideoPipeline

    call = dict(_ltx2_call(), image=conditioning_image())
    if "image_crf" in inspect.signature(LTX2ImageToVideoPipeline.__call__).parameters:
        call["image_crf"] = 0
    return call


@_KINDS.register("ltx2_i2v", "LTX2ImageToVideoPipeline", _ltx2_i2v_call)
def build_ltx2_i2v(seed: int = 0):
    """LTX-2 image-to-video: the components of _ltx2_components; the VAE encodes the first frame."""
    from diffusers import LTX2ImageToVideoPipeline

    return LTX2ImageToVideoPipeline(**_ltx2_components(seed))


def _hunyuan_video_call():
    # The bare prompt (no chat template to crop): PROMPT_TOKENS Llama tokens; guidance is an embedded scale.
    return dict(prompt=tiny_video_pipelines.PROMPT, prompt_template={"template": "{}", "crop_start": 0}, height=32,
                width=32, num_frames=9, guidance_scale=6.0, max_sequence_length=PROMPT_TOKENS)


@_KINDS.register("hunyuan_video", "HunyuanVideoPipeline", _hunyuan_video_call)
def build_hunyuan_video(seed: int = 0):
    """HunyuanVideo text-to-video: Llama (its second-last hidden states), CLIP (pooled), the dual/single-stream
    HunyuanVideoTransformer3DModel with its token refiner, the tiny AutoencoderKLHunyuanVideo of tiny_vaes (4x
    spatial and temporal: 9 frames of 32 x 32 -> 3 latent frames of 8 x 8, 2 x 2 patches: 48 video tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    from diffpar.testing import tiny_vaes

    width = tiny_video_pipelines.TEXT_WIDTH
    llama, _ = tiny_text_encoders.build("llama", seed=seed, heads=4, kv_heads=2, head_dim=8, hidden=width,
                                        intermediate=48, layers=3)
    clip, _ = tiny_text_encoders.build("clip", seed=seed + 1, heads=4, hidden=width, intermediate=37, layers=2,
                                       max_positions=77)
    vae, _, _ = tiny_vaes.build("hunyuan", seed=seed + 3)
    torch.manual_seed(seed + 2)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=width, pooled_projection_dim=width, rope_axes_dim=(4, 6, 6),
    ).eval()
    return HunyuanVideoPipeline(
        text_encoder=llama, tokenizer=tiny_text_encoders.t5_tokenizer(512), transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
        tokenizer_2=tiny_text_encoders.clip_tokenizer(77),
    )


def _chronoedit_call():
    # Without temporal reasoning the pipeline generates 5 frames: the input image and the edited one as the last.
    return dict(image=conditioning_image(), prompt=tiny_video_pipelines.PROMPT, height=32, width=32, num_frames=5,
                guidance_scale=1.0, max_sequence_length=PROMPT_TOKENS)


@_KINDS.register("chronoedit", "ChronoEditPipeline", _chronoedit_call)
def build_chronoedit(seed: int = 0):
    """ChronoEdit (image editing as a 2-latent-frame video): Wan 2.1 image-to-video components (UMT5, a CLIP vision
    encoder whose states join the prompt in every cross-attention, the tiny Wan VAE that encodes the input image)
    with ChronoEditTransformer3DModel (noise + mask + encoded image: 36 channels)."""
    from diffusers import ChronoEditPipeline, ChronoEditTransformer3DModel, FlowMatchEulerDiscreteScheduler

    heads, head_dim = 4, 12
    torch.manual_seed(seed + 2)
    transformer = ChronoEditTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=36,
        out_channels=16, text_dim=tiny_video_pipelines.TEXT_WIDTH, freq_dim=32, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=32,
        added_kv_proj_dim=heads * head_dim,
    ).eval()
    # The Wan image-to-video builder's UMT5, VAE and CLIP vision parts, seeded alike.
    return ChronoEditPipeline(**tiny_video_pipelines.wan_parts(seed, image_encoder=True), transformer=transformer,
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def _helios_call():
    # One chunk of 9 latent frames (33 frames of 32 x 32: 4 x 4 latents, 2 x 2 patches: 36 current tokens) plus
    # the zero short / mid / long history latents the pipeline feeds the transformer.
    return dict(prompt=tiny_video_pipelines.PROMPT, height=32, width=32, num_frames=9, guidance_scale=1.0,
                max_sequence_length=PROMPT_TOKENS)


@_KINDS.register("helios", "HeliosPipeline", _helios_call)
def build_helios(seed: int = 0):
    """Helios (autoregressive chunks with multi-term memory): UMT5, HeliosTransformer3DModel (history latents
    patched in beside the current chunk; history keys not amplified, as diffpar refuses that), the tiny Wan VAE,
    the one-stage HeliosScheduler."""
    from diffusers import HeliosPipeline, HeliosScheduler, HeliosTransformer3DModel

    torch.manual_seed(seed + 2)
    transformer = HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=tiny_video_pipelines.TEXT_WIDTH, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4), has_multi_term_memory_patch=True,
        guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False,
    ).eval()
    return HeliosPipeline(**tiny_video_pipelines.wan_parts(seed), transformer=transformer,
                          scheduler=HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True))
def _wan_animate_call():
    """Animate mode, one segment of 5 frames (2 latent frames after the reference one): a pose video and a face
    video (16 px: the motion encoder's size) of 5 deterministic frames each."""
    pose = [conditioning_image(seed=20 + i) for i in range(5)]
    face = [conditioning_image(16, 16, seed=30 + i) for i in range(5)]
    return dict(image=conditioning_image(), pose_video=pose, face_video=face, prompt=tiny_video_pipelines.PROMPT,
                height=32, width=32, segment_frame_length=5, guidance_scale=1.0, max_sequence_length=PROMPT_TOKENS)


@_KINDS.register("wan_animate", "WanAnimatePipeline", _wan_animate_call)
def build_wan_animate(seed: int = 0):
    """Wan 2.2 Animate: the Wan image-to-video parts (UMT5, CLIP vision, the tiny Wan VAE that encodes the
    reference image and the pose video) with WanAnimateTransformer3DModel (a small motion encoder for the face
    video, a face adapter after every block)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanAnimatePipeline, WanAnimateTransformer3DModel

    torch.manual_seed(seed + 2)
    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=36, latent_channels=16,
        out_channels=16, text_dim=tiny_video_pipelines.TEXT_WIDTH, freq_dim=32, ffn_dim=32, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", image_dim=32, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
        motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
        inject_face_latents_blocks=1,
    ).eval()
    return WanAnimatePipeline(**tiny_video_pipelines.wan_parts(seed, image_encoder=True), transformer=transformer,
                              scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))


def _call(pipe, kind: str, seed: int, steps: int):
    kwargs = call_arguments(kind)
    kwargs.update(num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt")
    output = pipe(**kwargs)
    return output.frames, getattr(output, "audio", None)  # LTX-2 also returns the audio it generated


def video_equivalence(kind: str, config: dict, extra: list[str] = (), steps: int = 2):
    """The video of a parallel run vs one process (as workers.video_pipelines.video_equivalence, on this module's
    builders): SplitProbe summaries of the transformer, the VAE split's calls (the audio VAE's too), each text
    encoder's share, and the audio where the pipeline makes some. Rank r passes generator seed r: diffpar's latent
    broadcast must make every rank use rank 0's noise."""
    runs = against_one_process(lambda: build(kind), lambda pipe, seed: _call(pipe, kind, seed, steps), config, extra,
                               seed=dist.get_rank(),
                               collect=lambda handle: {"audio_vae_calls": split_calls(handle, "audio_vae", extra)})
    return runs.video_report()
