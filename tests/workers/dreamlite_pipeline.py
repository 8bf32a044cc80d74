"""Rank-side end-to-end run of DreamLitePipeline (text to image): one process vs `enable_cache(pipe, ...)` with the
U-Net's attention stages context parallel, the Qwen3-VL text encoder tensor parallel and the VAE (AutoencoderTiny)
decode split by rows."""
from __future__ import annotations

import torch
import torch.distributed as dist

from diffpar.testing import tiny_text_encoders, tiny_transformers
from workers.end_to_end import against_one_process

PROMPT = "a red cat on a blue car"


def build_pipeline(seed: int = 0):
    from diffusers import AutoencoderTiny, DreamLitePipeline, FlowMatchEulerDiscreteScheduler

    from diffpar.testing.tiny_image_pipelines import qwen_vl_tokenizer

    unet, _ = tiny_transformers.build("dreamlite_unet", seed=seed)
    text_encoder, _ = tiny_text_encoders.build("qwen3_vl", seed=seed + 1, heads=4, kv_heads=2, head_dim=8, hidden=16)
    torch.manual_seed(seed + 2)
    vae = AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8),
                          decoder_block_out_channels=(8, 8), latent_channels=4, num_encoder_blocks=(1, 1),
                          num_decoder_blocks=(1, 1), upsampling_scaling_factor=2).eval()
    pipe = DreamLitePipeline(text_encoder=text_encoder.eval(), tokenizer=qwen_vl_tokenizer(), processor=None,
                             vae=vae, unet=unet.eval(), scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(steps: int, seed: int) -> dict:
    # 16 x 16 px: an 8 x 8 latent, doubled in width by the (empty) condition image: 128 tokens in the first stage.
    return dict(prompt=PROMPT, height=16, width=16, num_inference_steps=steps, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt", max_sequence_length=32)


def pipeline_equivalence(config: dict, steps: int = 2, rank_seeds: bool = True):
    runs = against_one_process(build_pipeline, lambda pipe, seed: pipe(**call_kwargs(steps, seed=seed)).images,
                               dict(config, vae_split_min_rows=0), ["text_encoder", "vae"],
                               seed=dist.get_rank() if rank_seeds else 0, repeat=True, denoiser="unet",
                               collect=lambda handle: {"text_encoder_state": repr(handle.state("text_encoder"))[:300]})
    return runs.image_report()
