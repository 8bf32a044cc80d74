"""Rank-side checks for JoyImage Edit Plus with a padded prompt (tests/test_joyimage_padded.py): the tiny
transformer with a text mask that masks tokens, and the whole pipeline with a prompt and a negative prompt of
different lengths (guidance batches the two, the shorter padded and masked)."""
from __future__ import annotations

import torch

from diffpar.testing import tiny_transformers
from workers import cp_transformers, image_pipelines_b
from workers.image_pipelines_e import _caller_size_processor, _joyimage_parts, _kind, _pil

TEXT_PADDED_BUILDER = "joyimage_edit_plus_text_padded"


@tiny_transformers.builder(TEXT_PADDED_BUILDER)
def _text_padded(**overrides):
    """The harness's tiny JoyImage Edit Plus, whose inputs take `text_valid`: real prompt tokens per sample (the
    rest of each row of `encoder_hidden_states_mask` is padding)."""
    if "joyimage_edit_plus" not in tiny_transformers.BUILDERS:
        from diffpar.testing.coverage import load_family_builders

        load_family_builders()
    model, make_inputs = tiny_transformers.BUILDERS["joyimage_edit_plus"](**overrides)

    def inputs(text_valid=(), **options):
        out = make_inputs(**options)
        batch, text = out["encoder_hidden_states"].shape[:2]
        assert len(text_valid) == batch, "one real-token count per sample"
        out["encoder_hidden_states_mask"] = (torch.arange(text)[None] < torch.tensor(text_valid)[:, None]).float()
        return out

    return model, inputs


def text_padded_cp(**kwargs):
    """cp_transformers.cp_equivalence on the text-padded model (`input_kwargs["text_valid"]`)."""
    return cp_transformers.cp_equivalence(model_name=TEXT_PADDED_BUILDER, **kwargs)


# -- the pipeline ------------------------------------------------------------------------------------------------
# Prompt masks the transformer received in the current process ("masked": some token masked), read by the test.
MASKS_SEEN: list[dict] = []


def _record_mask(module, args, kwargs):
    mask = kwargs.get("encoder_hidden_states_mask")
    if mask is not None:
        MASKS_SEEN.append({"masked": not bool(mask.bool().all()), "real_tokens": mask.bool().sum(1).tolist(),
                           "length": mask.shape[1]})


@_kind("joyimage_edit_plus_padded", "JoyImageEditPlusPipeline",
       # "dark" is far shorter than the prompt: guidance's batch of [negative, prompt] pads it and masks the padding
       lambda: dict(images=[_pil(32, 48, 32), _pil(48, 32, 33)], prompt="make the cat red and the sky blue",
                    negative_prompt="dark", height=48, width=48, guidance_scale=4.0),
       ("text_encoder", "vae"))
def _joyimage_edit_plus_padded(seed=0):
    """image_pipelines_e's JoyImage Edit Plus (two reference images of different shapes, 21 image tokens), called
    with prompts of different lengths; a pre-hook records the prompt mask each transformer call receives."""
    from diffusers import JoyImageEditPlusPipeline

    pipe = JoyImageEditPlusPipeline(**_joyimage_parts(seed, "joyimage_edit_plus"))
    pipe.image_processor = _caller_size_processor(pipe)
    pipe.transformer.register_forward_pre_hook(_record_mask, with_kwargs=True)
    return pipe


def padded_pipeline_equivalence(config: dict):
    """image_pipelines_b.pipeline_equivalence on the padded-prompt kind, plus the prompt masks the transformer saw
    (one process, then the parallel calls)."""
    MASKS_SEEN.clear()
    result = image_pipelines_b.pipeline_equivalence(kind="joyimage_edit_plus_padded", config=config)
    result["masks_seen"] = list(MASKS_SEEN)
    return result
