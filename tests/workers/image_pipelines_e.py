"""Rank-side whole image pipelines (tests/test_image_pipelines_e.py): Bria FIBO, Bria FIBO 2, JoyImage Edit and
JoyImage Edit Plus. Each is built tiny here from local parts (seeded random weights, in-memory tokenizers) and
registered in tests/workers/image_pipelines_b.py's KINDS, whose `pipeline_equivalence` runs it in one process, then
on every rank under `enable_cache` with the transformer context parallel, every text encoder tensor parallel and the
VAE split (decode; the edit pipelines' input image encode too)."""
from __future__ import annotations

import torch

from diffpar.testing import tiny_vaes
from diffpar.testing.tiny_transformers import construct, rope_axes
from workers import image_pipelines_b
from workers.image_pipelines_b import KINDS, _encoder, _kind  # noqa: F401 (KINDS: the test reads it)

from diffpar.testing import tiny_text_encoders

PROMPT = "a red fox in snow"  # 13 tokens with the tiny T5 tokenizer: odd


def _wan22_vae(seed: int, latent: int, mult=(1, 2, 2, 2)):
    """Wan 2.2's VAE (patchify 2): 16x spatially with four levels (FIBO assumes 16), one frame."""
    torch.manual_seed(seed)
    temporal = (False,) + (True,) * (len(mult) - 2)
    vae, _ = tiny_vaes.BUILDERS["wan22"](mult=mult, latent=latent, temporal=temporal)
    return vae.eval()


# -- Bria FIBO --------------------------------------------------------------------------------------------------
@_kind("bria_fibo", "BriaFiboPipeline",
       lambda: dict(prompt=PROMPT, negative_prompt="dark", height=64, width=64, guidance_scale=5.0),
       ("text_encoder", "vae"))
def _bria_fibo(seed=0):
    """SmolLM3 (its last two hidden states are the prompt, every hidden state feeds one block), classifier-free
    guidance as a batch of two with the shorter negative prompt masked, FLUX.1-style blocks over 4 x 4 = 16 image
    tokens (64 px through the 16x Wan 2.2 VAE): 13 + 16 tokens."""
    from diffusers import BriaFiboPipeline, BriaFiboTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import SmolLM3ForCausalLM

    smollm3 = _encoder("smollm3", seed, cls=SmolLM3ForCausalLM, heads=4, kv_heads=2, head_dim=8, hidden=32,
                       intermediate=48)
    torch.manual_seed(seed + 1)
    transformer = construct(
        BriaFiboTransformer2DModel, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64, text_encoder_dim=32,
        axes_dims_rope=list(rope_axes(16))).eval()
    return BriaFiboPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                            vae=_wan22_vae(seed + 2, latent=16), text_encoder=smollm3,
                            tokenizer=tiny_text_encoders.t5_tokenizer(512))


pipeline_equivalence = image_pipelines_b.pipeline_equivalence
reference_run = image_pipelines_b.reference_run
