"""What diffpar's tests prove for each denoiser class: the data `tests/test_families.py` runs and the model table
(`docs/models.md`, `python -m diffpar.testing.support_table`) prints.

A `ModelCase` names a tiny builder (`tiny_transformers.build(builder)`), the diffusers class it builds and which
layouts the harness runs on it. The claim and the test are the same data: a layout listed here is a test
parameter, so the table cannot say "tested" for something no test ran.

Cases of the families added through the harness live beside their builders in `testing/tiny_models/<family>.py`
(`CASES = [...]`). The first families (Flux, Flux2, QwenImage, Wan, Z-Image, SD3, HunyuanVideo) have their own
test files; their cases here say which (`suite`) and are checked against those files' parameters.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

# Context-parallel layouts: id -> (world, ParallelismConfig kwargs, sequence length, text length).
# Odd lengths for the *_anything modes: token counts the degree does not divide.
CP_LAYOUTS: dict[str, tuple[int, dict, int, int]] = {
    "w2-ulysses": (2, {"ulysses_size": 2}, 16, 8),
    "w2-ring": (2, {"ring_size": 2}, 16, 8),
    "w4-ulysses": (4, {"ulysses_size": 4}, 16, 8),
    "w4-ulysses2xring2": (4, {"ulysses_size": 2, "ring_size": 2}, 16, 8),
    "w2-ulysses-anything-odd": (2, {"ulysses_size": 2, "ulysses_anything": True}, 15, 7),
    "w4-ring-anything-odd": (4, {"ring_size": 4, "ring_anything": True}, 17, 7),
}
# Tensor-parallel layouts: id -> (world, config).
TP_LAYOUTS: dict[str, tuple[int, dict]] = {
    "w2-tp": (2, {"tp_size": 2}),
    "w4-tp": (4, {"tp_size": 4}),
    "w4-ulysses2xtp2": (4, {"ulysses_size": 2, "tp_size": 2}),
}
# Mode letters of the table (docs/models.md) for each layout.
MODE_OF_LAYOUT = {
    "w2-ulysses": "U", "w4-ulysses": "U", "w2-ring": "R", "w4-ring": "R", "w4-ulysses2xring2": "U×R",
    "w2-ulysses-anything-odd": "UA", "w4-ulysses-anything-odd-heads": "UA", "w4-ring-anything-odd": "RA",
    "w2-tp": "TP", "w4-tp": "TP", "w4-ulysses2xtp2": "U×TP", "w4-ring2xtp2": "R×TP",
}
ALL_CP = tuple(CP_LAYOUTS)
ALL_TP = tuple(TP_LAYOUTS)


@dataclass(frozen=True)
class ModelCase:
    """One denoiser class and what the tests run on it.

    builder: name in `tiny_transformers.BUILDERS`; class_name: the diffusers class it builds (the case is skipped,
    with the reason, on a release without the class); kind: "image", "video" or "audio"; cp / tp: layout ids run
    (CP_LAYOUTS / TP_LAYOUTS); model_kwargs: builder overrides for every layout (e.g. heads=4 so 4 ranks divide
    them); input_kwargs: extra input options; pipelines: pipeline classes run end to end elsewhere in the suite
    (listed in the table); refused: why the class cannot be split, when it cannot (then cp and tp are empty and
    the harness checks the refusal names that reason); suite: the test file that runs the case when it is not the
    harness; notes: one line for the table; min_diffusers: the first release whose class the builder supports.
    """

    builder: str
    class_name: str
    kind: str = "image"
    cp: tuple[str, ...] = ALL_CP
    tp: tuple[str, ...] = ALL_TP
    model_kwargs: dict = field(default_factory=lambda: {"heads": 4})
    input_kwargs: dict = field(default_factory=dict)
    pipelines: tuple[str, ...] = ()
    refused: str | None = None
    suite: str = "tests/test_families.py"
    notes: str = ""

    @property
    def harness(self) -> bool:
        return self.suite == "tests/test_families.py"

    def modes(self) -> list[str]:
        seen = []
        for layout in (*self.cp, *self.tp):
            mode = MODE_OF_LAYOUT[layout]
            if mode not in seen:
                seen.append(mode)
        return seen


# The first families: tested by their own files (layout ids as in those files' parameters; a test checks they are).
_FIRST_CP = ("w2-ulysses", "w2-ring", "w4-ulysses", "w4-ulysses2xring2", "w2-ulysses-anything-odd",
             "w4-ring-anything-odd")
_CP_SUITE = "tests/test_transformer_cp.py"
_OURS_SUITE = "tests/test_cp_plans_ours.py"
FIRST_CASES = [
    ModelCase("flux", "FluxTransformer2DModel", cp=_FIRST_CP, tp=("w2-tp", "w4-tp", "w4-ulysses2xtp2"),
              pipelines=("FluxPipeline", "FluxControlNetPipeline"), suite=_CP_SUITE),
    ModelCase("flux2", "Flux2Transformer2DModel", cp=_FIRST_CP, tp=("w2-tp", "w4-tp", "w4-ulysses2xtp2"),
              suite=_CP_SUITE),
    ModelCase("qwenimage", "QwenImageTransformer2DModel", cp=_FIRST_CP, tp=("w2-tp", "w4-tp", "w4-ulysses2xtp2"),
              pipelines=("QwenImageControlNetPipeline",), suite=_CP_SUITE,
              notes="padded prompt mask: U tested; R refused"),
    ModelCase("wan", "WanTransformer3DModel", kind="video", cp=_FIRST_CP, tp=("w2-tp", "w4-tp", "w4-ulysses2xtp2"),
              pipelines=("WanPipeline",), suite=_CP_SUITE),
    ModelCase("zimage", "ZImageTransformer2DModel", cp=_FIRST_CP, tp=("w2-tp", "w4-tp", "w4-ulysses2xtp2"),
              pipelines=("ZImageControlNetPipeline",), suite=_OURS_SUITE,
              notes="padding mask of unequal samples: refused under R"),
    ModelCase("sd3", "SD3Transformer2DModel", cp=_FIRST_CP, tp=(),
              pipelines=("StableDiffusion3ControlNetPipeline",), suite=_OURS_SUITE),
    ModelCase("hunyuan_video", "HunyuanVideoTransformer3DModel", kind="video", cp=_FIRST_CP, tp=(),
              suite=_OURS_SUITE, notes="image-to-video token_replace: see hunyuan_video_i2v"),
]


# Whole pipelines run end to end on 2 ranks (transformer, text encoders and VAE all parallel) against one process,
# by denoiser class: pipeline class -> the test file that runs it (tests/test_docs.py checks the file names it).
PIPELINES_TESTED: dict[str, dict[str, str]] = {
    "FluxTransformer2DModel": {
        "FluxPipeline": "tests/test_pipelines.py", "FluxControlNetPipeline": "tests/test_controlnet.py",
        "FluxKontextPipeline": "tests/test_image_pipelines.py", "FluxFillPipeline": "tests/test_image_pipelines.py",
        "FluxImg2ImgPipeline": "tests/test_image_pipelines.py"},
    "Flux2Transformer2DModel": {"Flux2Pipeline": "tests/test_image_pipelines.py"},
    "DreamLiteUNetModel": {"DreamLitePipeline": "tests/test_dreamlite_pipeline.py"},
    "HunyuanVideoTransformer3DModel": {"HunyuanVideoImageToVideoPipeline": "tests/test_hunyuan_i2v_pipeline.py",
                                       "HunyuanVideoPipeline": "tests/test_video_pipelines_b.py"},
    "LTX2VideoTransformer3DModel": {"LTX2ImageToVideoPipeline": "tests/test_video_pipelines_b.py",
                                    "LTX2Pipeline": "tests/test_video_pipelines_b.py"},
    "HiDreamImageTransformer2DModel": {"HiDreamImagePipeline": "tests/test_image_pipelines_b.py"},
    "HunyuanDiT2DModel": {"HunyuanDiTPipeline": "tests/test_image_pipelines_b.py"},
    "CogView3PlusTransformer2DModel": {"CogView3PlusPipeline": "tests/test_image_pipelines_b.py"},
    "LongCatImageTransformer2DModel": {"LongCatImagePipeline": "tests/test_image_pipelines_b.py"},
    "OvisImageTransformer2DModel": {"OvisImagePipeline": "tests/test_image_pipelines_b.py"},
    "BriaTransformer2DModel": {"BriaPipeline": "tests/test_image_pipelines_b.py"},
    "HunyuanImageTransformer2DModel": {"HunyuanImagePipeline": "tests/test_image_pipelines_b.py"},
    "ChromaTransformer2DModel": {"ChromaPipeline": "tests/test_image_pipelines_a.py", "ChromaImg2ImgPipeline": "tests/test_image_pipelines_a.py"},
    "CogView4Transformer2DModel": {"CogView4Pipeline": "tests/test_image_pipelines_a.py", "CogView4ControlPipeline": "tests/test_image_pipelines_a.py"},
    "Lumina2Transformer2DModel": {"Lumina2Pipeline": "tests/test_image_pipelines_a.py"},
    "SanaTransformer2DModel": {"SanaPipeline": "tests/test_image_pipelines_a.py"},
    "PixArtTransformer2DModel": {"PixArtSigmaPipeline": "tests/test_image_pipelines_a.py", "PixArtAlphaPipeline": "tests/test_image_pipelines_a.py"},
    "AuraFlowTransformer2DModel": {"AuraFlowPipeline": "tests/test_image_pipelines_a.py"},
    "Krea2Transformer2DModel": {"Krea2Pipeline": "tests/test_image_pipelines_c.py"},
    "QwenImage21Transformer2DModel": {"QwenImage21Pipeline": "tests/test_image_pipelines_c.py"},
    "PRXTransformer2DModel": {"PRXPipeline": "tests/test_image_pipelines_c.py"},
    "NucleusMoEImageTransformer2DModel": {"NucleusMoEImagePipeline": "tests/test_image_pipelines_c.py"},
    "ErnieImageTransformer2DModel": {"ErnieImagePipeline": "tests/test_image_pipelines_c.py"},
    "GlmImageTransformer2DModel": {"GlmImagePipeline": "tests/test_image_pipelines_c.py"},
    "Flux3Transformer2DModel": {"Flux3ModularPipeline": "tests/test_image_pipelines_c.py"},
    "OmniGenTransformer2DModel": {"OmniGenPipeline": "tests/test_omnigen_pipeline.py"},
    "LuminaNextDiT2DModel": {"LuminaPipeline": "tests/test_image_pipelines_d.py"},
    "DiTTransformer2DModel": {"DiTPipeline": "tests/test_image_pipelines_d.py"},
    "Ideogram4Transformer2DModel": {"Ideogram4Pipeline": "tests/test_image_pipelines_d.py"},
    "BriaFiboTransformer2DModel": {"BriaFiboPipeline": "tests/test_image_pipelines_e.py"},
    "BriaFibo2Transformer2DModel": {"BriaFibo2Pipeline": "tests/test_image_pipelines_e.py"},
    "JoyImageEditTransformer3DModel": {"JoyImageEditPipeline": "tests/test_image_pipelines_e.py"},
    "JoyImageEditPlusTransformer3DModel": {"JoyImageEditPlusPipeline": "tests/test_image_pipelines_e.py"},
    "ChronoEditTransformer3DModel": {"ChronoEditPipeline": "tests/test_video_pipelines_b.py"},
    "HeliosTransformer3DModel": {"HeliosPipeline": "tests/test_video_pipelines_b.py"},
    "WanAnimateTransformer3DModel": {"WanAnimatePipeline": "tests/test_video_pipelines_b.py"},
    "SD3Transformer2DModel": {
        "StableDiffusion3Pipeline": "tests/test_cfg.py",
        "StableDiffusion3Img2ImgPipeline": "tests/test_image_pipelines.py",
        "StableDiffusion3ControlNetPipeline": "tests/test_controlnet.py"},
    "QwenImageTransformer2DModel": {
        "QwenImagePipeline": "tests/test_cfg.py", "QwenImageEditPipeline": "tests/test_image_pipelines.py",
        "QwenImageEditPlusPipeline": "tests/test_image_pipelines.py",
        "QwenImageInpaintPipeline": "tests/test_image_pipelines.py",
        "QwenImageControlNetPipeline": "tests/test_controlnet.py"},
    "ZImageTransformer2DModel": {"ZImageControlNetPipeline": "tests/test_controlnet.py"},
    "WanTransformer3DModel": {
        "WanPipeline": "tests/test_pipelines.py", "WanImageToVideoPipeline": "tests/test_video_pipelines.py"},
    "WanVACETransformer3DModel": {"WanVACEPipeline": "tests/test_video_pipelines.py"},
    "CogVideoXTransformer3DModel": {
        "CogVideoXPipeline": "tests/test_video_pipelines.py",
        "CogVideoXImageToVideoPipeline": "tests/test_video_pipelines.py"},
    "HunyuanVideo15Transformer3DModel": {
        "HunyuanVideo15Pipeline": "tests/test_video_pipelines.py",
        "HunyuanVideo15ImageToVideoPipeline": "tests/test_video_pipelines.py"},
    "LTXVideoTransformer3DModel": {"LTXImageToVideoPipeline": "tests/test_video_pipelines.py"},
    "SkyReelsV2Transformer3DModel": {"SkyReelsV2DiffusionForcingPipeline": "tests/test_video_pipelines.py"},
    "Kandinsky5Transformer3DModel": {"Kandinsky5T2VPipeline": "tests/test_video_pipelines.py"},
}


def _family_modules():
    from diffpar.testing import tiny_models

    for info in sorted(pkgutil.iter_modules(tiny_models.__path__), key=lambda i: i.name):
        yield importlib.import_module(f"{tiny_models.__name__}.{info.name}")


def load_family_builders() -> None:
    """Import every tiny_models module (each registers its builders on import)."""
    for _ in _family_modules():
        pass


def harness_cases() -> list[ModelCase]:
    """Every case the family harness runs, in a stable order."""
    cases = []
    for module in _family_modules():
        cases.extend(getattr(module, "CASES", ()))
    return cases


def all_cases() -> list[ModelCase]:
    return FIRST_CASES + harness_cases()


def class_available(class_name: str) -> bool:
    import diffusers

    try:
        getattr(diffusers, class_name)
    except (AttributeError, ImportError):
        return False
    return True
