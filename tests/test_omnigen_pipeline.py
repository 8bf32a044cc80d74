"""OmniGen's pipeline end to end on 2 ranks (issue 12), with or without torchvision: the transformer context parallel
(Ulysses 2: its pipeline always passes a causal mask, which the ring cannot apply), the VAE split (decode; the input
image's encode), vs the same pipeline in one process. Text to image, and editing an input image, which goes through
the processor's image transforms (torchvision's, or the worker's stand-in where torchvision is missing: diffusers
builds the processor only with torchvision). Rank r passes generator seed r: diffpar's latent broadcast must make
every rank use rank 0's noise."""
import importlib.util

import numpy as np
import pytest
import torch
from tolerances import PIPELINE_FP32

import diffusers
from availability import diffusers_has

from diffpar.compat.diffusers_cp import uneven_split_option
from diffpar.testing.probes import assert_split

pytestmark = [
    pytest.mark.skipif(not diffusers_has("OmniGenPipeline"), reason=f"diffusers {diffusers.__version__} has no OmniGen"),
    # the sequences are odd (below): they need diffusers' uneven Ulysses split; 0.36 refuses them (test_any_input.py)
    pytest.mark.skipif(uneven_split_option(2, 1) is None, reason="odd lengths need diffusers' uneven Ulysses split"),
]

ULYSSES = {"ulysses_size": 2}
TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _check(results):
    for r in results:
        assert r["diff"] <= PIPELINE_FP32, (r["rank"], r["diff"], r["scale"])
        assert r["repeat_diff"] == 0.0, "a second call must give the same image (no state left between calls)"
        assert r["ranks_identical"], "every rank must hold the same image"
        assert r["detach_problems"] == [], r["detach_problems"]  # no text encoder: OmniGen embeds the prompt's ids
        assert r["vae_calls"]["decode"]["split"] >= 1 and r["vae_calls"]["decode"]["whole"] == 0, r["vae_calls"]
        assert r["transforms"] == ("torchvision" if TORCHVISION else "stand-in")
    assert_split(results, ULYSSES)  # every denoising step's attention ran on a token shard


def test_text_to_image(ranks):
    results = ranks(2, "workers.omnigen_pipeline:pipeline_equivalence", kind="omnigen", config=ULYSSES, timeout=300)
    _check(results)
    for r in results:
        # one sequence: templated prompt 442 + time token + 16 image tokens = 459, odd
        assert r["split_reference"]["image_tokens"][0] % 2 == 1, r["split_reference"]
        assert r["vae_calls"]["encode"]["split"] == 0, r["vae_calls"]  # no input image


def test_with_input_image(ranks):
    results = ranks(2, "workers.omnigen_pipeline:pipeline_equivalence", kind="omnigen_image", config=ULYSSES,
                    timeout=300)
    _check(results)
    for r in results:
        # the input image went through the transforms and the split VAE encode, its 6 tokens into the sequence
        assert r["vae_calls"]["encode"]["split"] >= 1 and r["vae_calls"]["encode"]["whole"] == 0, r["vae_calls"]
        assert r["split_reference"]["image_tokens"][0] % 2 == 1, r["split_reference"]


# -- the stand-in transforms ---------------------------------------------------------------------------------------
def _image(height=5, width=7, mode="RGB"):
    from PIL import Image

    g = torch.Generator().manual_seed(3)
    channels = 3 if mode == "RGB" else 1
    pixels = (torch.rand(height, width, channels, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels if mode == "RGB" else pixels[:, :, 0], mode=mode)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_stand_in_transforms_do_what_torchvision_does(mode):
    from workers.omnigen_pipeline import STAND_IN_TRANSFORMS as T

    image = _image(mode=mode)
    tensor = T.ToTensor()(image)
    pixels = np.array(image)
    pixels = pixels if pixels.ndim == 3 else pixels[:, :, None]
    expected = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    assert tensor.dtype == torch.float32 and tensor.shape == (len(image.getbands()), 5, 7)
    assert torch.equal(tensor, expected)
    mean, std = [0.5] * tensor.shape[0], [0.5] * tensor.shape[0]
    normalized = T.Normalize(mean=mean, std=std, inplace=True)(tensor)
    assert normalized is tensor and torch.equal(normalized, (expected - 0.5) / 0.5)  # in place, as asked
    copy = T.Normalize(mean=mean, std=std)(expected)
    assert copy is not expected and torch.equal(copy, normalized)
    crop = T.Lambda(lambda im: im.crop((0, 0, 4, 4)))
    assert T.Compose([crop, T.ToTensor()])(image).shape == (tensor.shape[0], 4, 4)
    if TORCHVISION:  # where it is installed: the same tensors bit for bit
        from torchvision import transforms

        assert torch.equal(transforms.ToTensor()(image), expected)
        assert torch.equal(transforms.Normalize(mean, std)(expected), normalized)


def test_stand_in_is_attached_only_inside_the_context():
    from diffusers.pipelines.omnigen import pipeline_omnigen, processor_omnigen

    from workers.omnigen_pipeline import omnigen_processor_available

    before = (vars(processor_omnigen).get("transforms"), vars(pipeline_omnigen).get("OmniGenMultiModalProcessor"))
    with pytest.raises(RuntimeError, match="inside"):
        with omnigen_processor_available() as transforms:
            assert transforms == ("torchvision" if TORCHVISION else "stand-in")
            assert pipeline_omnigen.OmniGenMultiModalProcessor is processor_omnigen.OmniGenMultiModalProcessor
            raise RuntimeError("inside")  # the exit must undo on an error too
    after = (vars(processor_omnigen).get("transforms"), vars(pipeline_omnigen).get("OmniGenMultiModalProcessor"))
    assert after[0] is before[0] and after[1] is before[1]
