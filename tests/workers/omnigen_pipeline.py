"""Rank-side OmniGen pipeline (tests/test_omnigen_pipeline.py), text to image and with an input image, on every
rank under `enable_cache` vs one process (image_pipelines_a's `pipeline_equivalence`).

diffusers builds OmniGen's multimodal processor only where torchvision is installed (`pipeline_omnigen` imports
`OmniGenMultiModalProcessor` under `is_torchvision_available()`), and the processor's image transform is
`transforms.Compose([Lambda(crop), ToTensor(), Normalize(0.5, 0.5, inplace=True)])`. torchvision cannot be installed
with this torch build, so where the pipeline module lacks the processor, `omnigen_processor_available()` gives
`processor_omnigen` a local stand-in for those four transforms (doing what torchvision's do) and `pipeline_omnigen`
the processor class, for the duration of the call only; where torchvision is installed nothing is touched."""
from __future__ import annotations

import contextlib
import types

import numpy as np
import torch

from workers import image_pipelines_a
from workers import image_pipelines_d  # noqa: F401 (registers the "omnigen" text-to-image builder)
from workers.image_pipelines_e import _pil


# -- the four torchvision transforms OmniGen's processor uses ------------------------------------------------------
class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, image):
        return self.fn(image)


class ToTensor:
    """An 8-bit PIL image or (H, W, C) uint8 array -> a (C, H, W) float tensor in [0, 1] (torchvision divides 8-bit
    pixels by 255 in the default float dtype). Other modes (16-bit, float, 1-bit) are refused, not guessed."""

    def __call__(self, image):
        array = np.array(image, copy=True)
        if array.dtype != np.uint8:
            raise TypeError(f"this ToTensor stand-in takes 8-bit images, not {array.dtype}")
        if array.ndim == 2:  # one channel (mode "L")
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)


class Normalize:
    """(tensor - mean) / std per channel; `inplace` changes the given tensor, as torchvision's does."""

    def __init__(self, mean, std, inplace=False):
        self.mean, self.std, self.inplace = mean, std, inplace

    def __call__(self, tensor):
        if not self.inplace:
            tensor = tensor.clone()
        mean = torch.as_tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
        if bool((std == 0).any()):
            raise ValueError("std evaluated to zero, leading to division by zero.")
        return tensor.sub_(mean).div_(std)


STAND_IN_TRANSFORMS = types.SimpleNamespace(Compose=Compose, Lambda=Lambda, ToTensor=ToTensor, Normalize=Normalize)


@contextlib.contextmanager
def omnigen_processor_available():
    """Yields "torchvision" where diffusers' OmniGen pipeline has its processor (torchvision installed), else
    "stand-in" with the stand-in transforms and the processor class attached to diffusers' modules, removed on
    exit (also on error)."""
    from diffusers.pipelines.omnigen import pipeline_omnigen, processor_omnigen

    if hasattr(pipeline_omnigen, "OmniGenMultiModalProcessor"):
        yield "torchvision"
        return
    attached = []
    try:
        for module, name, value in ((processor_omnigen, "transforms", STAND_IN_TRANSFORMS),
                                    (pipeline_omnigen, "OmniGenMultiModalProcessor",
                                     processor_omnigen.OmniGenMultiModalProcessor)):
            assert not hasattr(module, name), f"{module.__name__}.{name} is already there"
            attached.append((module, name))  # before the change: the exit removes what was set
            setattr(module, name, value)
        yield "stand-in"
    finally:
        for module, name in reversed(attached):
            if name in vars(module):
                delattr(module, name)


# -- OmniGen with an input image -----------------------------------------------------------------------------------
@image_pipelines_a.builder("omnigen_image")
def _omnigen_image(seed: int):
    """image_pipelines_d's tiny OmniGen, asked to edit an image: 40 x 56 px, cropped by the processor to 32 x 48
    (multiples of 16), encoded by the (split) VAE into 2 x 3 = 6 tokens placed in the prompt. Guidance with an image
    is one batch of three (prompt, negative, image only), whose prompts differ in length (padded)."""
    pipe, _, parallel = image_pipelines_a.BUILDERS["omnigen"](seed)

    def call_kwargs(steps: int, seed: int) -> dict:
        return dict(prompt="make the fox in <img><|image_1|></img> red", input_images=[_pil(40, 56, 35)],
                    height=64, width=64, num_inference_steps=steps, guidance_scale=3.0, img_guidance_scale=1.6,
                    generator=torch.Generator().manual_seed(seed), output_type="pt")

    return pipe, call_kwargs, parallel


def pipeline_equivalence(kind: str, config: dict, steps: int = 2):
    """image_pipelines_a.pipeline_equivalence for an OmniGen kind, with the processor available; "transforms" says
    whose transforms ran. The input image's posterior is sampled from torch's global RNG (no generator): every call
    seeds it alike."""
    with omnigen_processor_available() as transforms:
        result = image_pipelines_a.pipeline_equivalence(kind, config, steps=steps, global_seed="same")
    result["transforms"] = transforms
    return result
