"""Rank side of tests/test_hunyuan_i2v_pipeline.py: a tiny HunyuanVideoImageToVideoPipeline ("token_replace"), one
process vs `enable_cache(pipe, ...)` with the transformer context parallel, both text encoders tensor parallel and
the VAE split, on this world.

The tiny pipeline: a Llava text encoder (Llama language model, 16 image tokens from a CLIP vision tower), a CLIP
text encoder (pooled), the HunyuanVideo transformer with `image_condition_type="token_replace"`, the tiny
AutoencoderKLHunyuanVideo (4x spatial and temporal). The prompt template is the real one's shape in a word
tokenizer's vocabulary: [header, system, header end, <image>, system text, eot, header, user, header end] before
the prompt, the 4 assistant-header tokens after it, so the pipeline's crops land where they do on the real one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from diffpar.testing import tiny_text_encoders, tiny_video_pipelines
from workers.end_to_end import against_one_process

SPECIAL = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>")
IMAGE_TOKENS = 16  # the CLIP vision tower's patches: (16 px / 4 px) ** 2
TEMPLATE = {
    "template": ("<|start_header_id|>a<|end_header_id|><image>photo<|eot_id|><|start_header_id|>day<|end_header_id|>"
                 "{}<|eot_id|><|start_header_id|>night<|end_header_id|>"),
    "crop_start": 9,  # the prompt's first token
    "image_emb_start": 3,
    "image_emb_end": 3 + IMAGE_TOKENS,
    "image_emb_len": IMAGE_TOKENS,
}
TEXT_WIDTH = 32
PROMPT = "a red dog in the sky"  # words of the tokenizer's vocabulary: one token each


def llama_style_tokenizer():
    """The word tokenizer with the Llama-3 chat markers and `<image>` as single tokens."""
    from transformers import AddedToken

    tok = tiny_text_encoders.t5_tokenizer(512)
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(t, normalized=False) for t in SPECIAL]})
    return tok


def build(seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoImageToVideoPipeline
    from transformers import CLIPImageProcessor

    from diffpar.testing import tiny_transformers, tiny_vaes

    tokenizer = llama_style_tokenizer()
    llava, _ = tiny_text_encoders.build("llava", seed=seed, heads=4, kv_heads=2, head_dim=8, hidden=TEXT_WIDTH,
                                        intermediate=48, layers=3)
    llava.config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    # The pipeline reads the top-level pad id, which transformers 5's LlavaConfig keeps only in its text config.
    llava.config.pad_token_id = tokenizer.pad_token_id
    clip, _ = tiny_text_encoders.build("clip", seed=seed + 1, heads=4, hidden=TEXT_WIDTH, intermediate=48,
                                       max_positions=77)
    vae, _, _ = tiny_vaes.build("hunyuan", seed=seed + 3)
    transformer, _ = tiny_transformers.build("hunyuan_video_i2v", seed=seed + 2, heads=4)
    pipe = HunyuanVideoImageToVideoPipeline(
        text_encoder=llava, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=clip,
        tokenizer_2=tiny_text_encoders.clip_tokenizer(77),
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_arguments() -> dict:
    # 9 frames -> 3 latent frames of 8 x 8 latents: 48 video tokens, 16 of them the first frame (24 per rank on 2).
    return dict(image=tiny_video_pipelines.conditioning_image(), prompt=PROMPT,
                prompt_template=TEMPLATE, height=32, width=32, num_frames=9, max_sequence_length=14,
                guidance_scale=6.0, num_inference_steps=2, output_type="pt")


def run_pipeline(pipe, seed: int):
    return pipe(**call_arguments(), generator=torch.Generator().manual_seed(seed)).frames


def pipeline_equivalence(config: dict, extra: list[str] = ("text_encoder", "text_encoder_2", "vae")):
    """The video of a parallel run vs one process (rank r passes seed r: the latent broadcast must make every rank
    use rank 0's noise), with the transformer's SplitProbe summaries, the VAE split's calls, the encoders' shares."""
    runs = against_one_process(build, run_pipeline, config, extra, seed=dist.get_rank())
    return runs.video_report()
