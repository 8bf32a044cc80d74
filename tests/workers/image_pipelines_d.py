"""Rank-side whole image pipelines (tests/test_image_pipelines_d.py): OmniGen, Lumina-Next, DiT, Ideogram 4.
Each is built tiny here from local parts (seeded random weights, in-memory tokenizers) and registered into
`workers.image_pipelines_a`'s builders, whose `pipeline_equivalence` runs it in one process and then on every rank
under `enable_cache` (transformer context parallel, text encoder tensor parallel, VAE split)."""
from __future__ import annotations

import torch

from diffpar.testing import tiny_pipelines, tiny_text_encoders
from diffpar.testing.tiny_transformers import construct
# pipeline_equivalence / reference_only are this module's entry points (the builders register into _a's table)
from workers.image_pipelines_a import PROMPT, builder, pipeline_equivalence, reference_only  # noqa: F401


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _eight_times_vae(seed: int):
    """A four-block AutoencoderKL (8x, as OmniGen's processor assumes when it counts the image's tokens)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.13025,
    ).eval()


@builder("omnigen")
def _omnigen(seed: int):
    """OmniGenPipeline: no text encoder (the transformer embeds the prompt's token ids itself, one sequence of
    prompt, time token and 4 x 4 = 16 image tokens: 64 px through an 8x VAE); guidance as one batch of two."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OmniGenPipeline, OmniGenTransformer2DModel

    heads, head_dim = 4, 8
    torch.manual_seed(seed + 2)
    rope = {"long_factor": [1.0] * (head_dim // 2), "short_factor": [1.0] * (head_dim // 2)}
    transformer = construct(
        OmniGenTransformer2DModel, in_channels=4, patch_size=2, hidden_size=heads * head_dim,
        num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=32, num_layers=2,
        vocab_size=tiny_text_encoders.VOCAB, pad_token_id=0, pos_embed_max_size=32, time_step_dim=16,
        rope_scaling=rope,
    ).eval()
    vae = _eight_times_vae(seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(invert_sigmas=True, num_train_timesteps=1)  # OmniGen's own
    pipe = OmniGenPipeline(transformer=transformer, scheduler=scheduler,
                           vae=vae, tokenizer=tiny_text_encoders.t5_tokenizer(512))

    def call_kwargs(steps: int, seed: int) -> dict:
        return dict(prompt=PROMPT, height=64, width=64, num_inference_steps=steps, guidance_scale=3.0,
                    generator=_generator(seed), output_type="pt")

    return pipe, call_kwargs, ("vae",)


@builder("lumina-next")
def _lumina_next(seed: int):
    """LuminaPipeline (Lumina-Next): a Gemma encoder (its second-to-last hidden state is the prompt), the
    LuminaNextDiT2DModel on 2 x 2 patches (64 image tokens) with cross-attention to the prompt, guidance as one batch
    of two. The pipeline pads the prompt to a multiple of 8 itself: its text length is even whatever we ask."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline

    gemma, _ = tiny_text_encoders.build("gemma", seed=seed, heads=4, kv_heads=2, head_dim=8, hidden=32,
                                        intermediate=48)
    torch.manual_seed(seed + 2)
    transformer = construct(
        LuminaNextDiT2DModel, sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
        num_attention_heads=4, num_kv_heads=2, multiple_of=16, norm_eps=1e-5, learn_sigma=True, qk_norm=True,
        cross_attention_dim=32, scaling_factor=1.0,
    ).eval()
    with torch.no_grad():  # created uninitialized (torch.empty): seed it like the rest
        transformer.pad_token.normal_(generator=_generator(seed + 4))
    pipe = LuminaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                          vae=tiny_pipelines.tiny_image_vae(seed + 3, shift_factor=0.0, scaling_factor=0.13025),
                          text_encoder=gemma, tokenizer=tiny_text_encoders.t5_tokenizer(512))

    def call_kwargs(steps: int, seed: int) -> dict:
        # LuminaPipeline assumes an 8x VAE: 128 px asks for a 16 x 16 latent, which the tiny 2x VAE decodes to 32 px
        return dict(prompt=PROMPT, negative_prompt="dark", height=128, width=128, num_inference_steps=steps,
                    guidance_scale=4.0, clean_caption=False, generator=_generator(seed), output_type="pt")

    return pipe, call_kwargs, ("text_encoder", "vae")


@builder("dit")
def _dit(seed: int):
    """DiTPipeline: class-conditional (no text encoder; guidance as one batch of two, the null class 1000), the
    DiTTransformer2DModel on a 10 x 10 latent in 2 x 2 patches: 25 image tokens, odd."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

    class TorchOutputDiTPipeline(DiTPipeline):
        """DiTPipeline returns numpy whatever `output_type` says: hand the image back as a tensor."""

        def __call__(self, *args, **kwargs):
            images = super().__call__(*args, **kwargs).images
            return ImagePipelineOutput(images=torch.from_numpy(images))

    torch.manual_seed(seed + 2)
    transformer = construct(
        DiTTransformer2DModel, num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, sample_size=10, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    ).eval()
    vae = tiny_pipelines.tiny_image_vae(seed + 3, shift_factor=0.0, scaling_factor=0.18215)
    pipe = TorchOutputDiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())

    def call_kwargs(steps: int, seed: int) -> dict:
        return dict(class_labels=[3], guidance_scale=4.0, num_inference_steps=steps, generator=_generator(seed),
                    output_type="np")

    return pipe, call_kwargs, ("vae",)


@builder("ideogram4")
def _ideogram4(seed: int):
    """Ideogram4Pipeline: a Qwen3-VL encoder run layer by layer (36 layers: the pipeline taps 13 fixed ones, up to
    layer 35, and joins them as the prompt's features: 13 x 16 = 208), a conditional and an unconditional
    Ideogram4Transformer2DModel over one packed [left-padded prompt][image] sequence (asymmetric guidance: two
    transformers), the Flux 2 VAE (latent patchified 2 x 2: 4 x 4 = 16 image tokens at 32 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline, Ideogram4Transformer2DModel

    from diffpar.testing import tiny_vaes

    full, _ = tiny_text_encoders.build("qwen3_vl", seed=seed, heads=4, kv_heads=2, head_dim=8, hidden=16,
                                       intermediate=24, layers=36)
    qwen = full.model  # the pipeline reads `text_encoder.language_model`: the Qwen3VLModel, not the LM wrapper

    def transformer(offset: int):
        torch.manual_seed(seed + offset)
        return construct(
            Ideogram4Transformer2DModel, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=4,
            intermediate_size=64, adaln_dim=16, llm_features_dim=13 * 16, mrope_section=(4, 2, 2),
        ).eval()

    vae, _, _ = tiny_vaes.build("flux2", seed=seed + 3)
    pipe = Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=qwen,
                             tokenizer=tiny_text_encoders.chat_tokenizer(64), transformer=transformer(2),
                             unconditional_transformer=transformer(5))

    def call_kwargs(steps: int, seed: int) -> dict:
        return dict(prompt=PROMPT, height=32, width=32, num_inference_steps=steps, guidance_scale=4.0,
                    guidance_schedule=None, max_sequence_length=35, generator=_generator(seed),
                    output_type="pt")

    # Both transformers (conditional and unconditional) are denoisers diffpar parallelizes by their attribute
    # names (components.DENOISER_ATTRS).
    return pipe, call_kwargs, ("text_encoder", "vae")
