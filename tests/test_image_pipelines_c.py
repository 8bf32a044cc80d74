"""Whole text-to-image pipelines on 2 ranks (issue 12 item 3, issue 13 item 4): Krea 2, Qwen-Image 2.1, PRX,
Nucleus-MoE Image, ERNIE-Image, GLM-Image (its diffusion decoder) and FLUX.3 (modular). Each is built tiny from
local components; the transformer runs context parallel (Ulysses 2, an odd sequence where the pipeline allows one),
every text encoder the pipeline builds tensor parallel and the VAE decode split; the image must be within
PIPELINE_FP32 of the same pipeline in one process, identical on every rank, and the split proven (image tokens and
collectives per rank, text-encoder weights per rank smaller than whole, VAE split calls). None of these pipelines
encodes an input image in a text-to-image call, so only the decode is split."""
from tolerances import PIPELINE_FP32

from availability import needs, needs_uneven_split

from diffpar.testing.probes import assert_split

pytestmark = needs_uneven_split()  # odd lengths are the point of these tests

ULYSSES = {"ulysses_size": 2}
# vae_split_min_rows=0: the tiny 32 px images have 8 latent rows, below the default threshold for splitting
CONFIG = dict(ULYSSES, vae_split_min_rows=0)


def _check(results, encoders=("text_encoder",), **split_options):
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"], r["scale"])
        assert r["ranks_identical"], "every rank must hold the same image"
        for name in encoders:  # tensor parallel: each rank holds a share of every attention's heads and MLPs
            share = r["text_encoders"][name]  # (embeddings stay whole, so tiny models keep more than half)
            assert share["bytes_ratio"] < 0.75, (name, share)
            for layout in share["heads_per_rank"]:  # per attention layout: (query heads, KV heads) on each rank
                assert len(layout) == len(results) and all(q < sum(h[0] for h in layout) for q, _ in layout), share
        calls = r["vae_calls"]
        assert calls["decode"]["split"] >= 1 and calls["decode"]["whole"] == 0, calls
    assert_split(results, ULYSSES, **split_options)  # every transformer forward ran on a shard


def _run(ranks, kind, rank_seeds=True, **call_overrides):
    """rank_seeds: rank r passes generator seed r, relying on diffpar's latent broadcast (at prepare_latents) to
    make every rank denoise rank 0's noise."""
    return ranks(2, "workers.image_pipelines_c:pipeline_equivalence", kind=kind, config=CONFIG,
                 rank_seeds=rank_seeds, call_overrides=call_overrides, timeout=300)


@needs("Krea2Pipeline")
def test_krea2(ranks):
    """Krea2Pipeline: Qwen3VLModel tensor parallel (its three tapped hidden states feed the text fusion, which
    runs whole on every rank), 16 image tokens after 37 text tokens (53: odd), classifier-free guidance (two transformer
    calls per step)."""
    _check(_run(ranks, "krea2"))


@needs("QwenImage21Pipeline")
def test_qwenimage21(ranks):
    """QwenImage21Pipeline (text to image): Qwen3VLForConditionalGeneration tensor parallel (its language model;
    the vision tower stays whole), 31 text tokens + 16 image tokens, the second step from the text key/value cache
    the first fills, the 16x VAE's decode split."""
    _check(_run(ranks, "qwenimage21"))


@needs("PRXPipeline")
def test_prx(ranks):
    """PRXPipeline: T5Gemma's encoder stack tensor parallel (eager attention: transformers has no SDPA path for
    it), 16 image tokens with a 15-token prompt, classifier-free guidance batched (two rows per transformer call)."""
    _check(_run(ranks, "prx"))


@needs("NucleusMoEImagePipeline")
def test_nucleusmoe_image(ranks):
    """NucleusMoEImagePipeline: Qwen3VLForConditionalGeneration tensor parallel, 15 image tokens (odd) after the
    prompt (264 tokens, a multiple of 8: the pipeline pads to one, and diffpar refuses a padded prompt on this
    transformer), classifier-free guidance, a dense block then a routed-experts block."""
    _check(_run(ranks, "nucleusmoe"))


@needs("ErnieImagePipeline")
def test_ernie_image(ranks):
    """ErnieImagePipeline (no prompt enhancer): Mistral3Model tensor parallel, a 13-token prompt and 15 image tokens
    (both odd), classifier-free guidance batched with an empty negative prompt (rows of different text lengths).

    Every rank passes the same seed: this pipeline draws its noise inline (randn_tensor in __call__), with no
    prepare_latents where diffpar broadcasts rank 0's latents, so rank seeds would give each rank its own noise
    (see test_ernie_image_rank_seeds_not_broadcast)."""
    _check(_run(ranks, "ernie_image", rank_seeds=False))


@needs("ErnieImagePipeline")
def test_ernie_image_rank_seeds_get_rank_0s_noise(ranks):
    """ErnieImagePipeline draws its noise inline (no prepare_latents): with a seed per rank, the generators get rank
    0's state at the call's start, so the image is rank 0's (it was silently another before)."""
    results = _run(ranks, "ernie_image", rank_seeds=True)
    assert all(r["diff"] <= PIPELINE_FP32 for r in results), [r["diff"] for r in results]


@needs("GlmImagePipeline")
def test_glm_image(ranks):
    """GlmImagePipeline's diffusion decoder with given prior tokens (the autoregressive GLM that writes them is left
    out): the T5 glyph encoder tensor parallel, 10 image tokens (even: the pipeline admits no odd count) after 5
    glyph tokens of the prompt's quoted text (odd), no guidance (see the next test)."""
    _check(_run(ranks, "glm_image"))


@needs("GlmImagePipeline")
def test_glm_image_guidance_one_glyph_token(ranks):
    """With guidance the unconditional call's glyph text is ONE token (an empty negative prompt), fewer than the 2
    ranks: GLM-Image's plan cuts that call over the joint sequence [text, image] (11 tokens: rank 0 the text token
    and 5 image tokens, rank 1 5 image tokens), the conditional one per stream (5 text tokens: 3 + 2, 10 image
    tokens: 5 + 5). Both calls of every step split; the image matches one process."""
    results = _run(ranks, "glm_image", guidance_scale=2.0)
    _check(results)
    for r in results:  # forwards alternate conditional, unconditional (2 steps)
        split = r["split"]
        assert split["text_tokens"] == [(3, 2)[r["rank"]], (1, 0)[r["rank"]]] * 2, split
        assert split["image_tokens"] == [5, 5] * 2, split
        assert r["split_reference"]["text_tokens"] == [5, 1] * 2, r["split_reference"]


@needs("Flux3AutoBlocks")
def test_flux3_modular(ranks):
    """Flux3ModularPipeline (diffusers ships FLUX.3 as a modular pipeline only), without its prompt upsampler:
    Qwen3VLForConditionalGeneration tensor parallel, 15 image tokens (odd) after an 80-token padded prompt. Every
    rank passes the same seed here (the next test passes a seed per rank)."""
    _check(_run(ranks, "flux3", rank_seeds=False))


@needs("Flux3AutoBlocks")
def test_flux3_modular_rank_seeds_get_rank_0s_noise(ranks):
    """A modular pipeline draws its noise in a block: with a seed per rank, the generators get rank 0's state at the
    call's start, so the image is rank 0's."""
    results = _run(ranks, "flux3", rank_seeds=True)
    assert all(r["diff"] <= PIPELINE_FP32 for r in results), [r["diff"] for r in results]
