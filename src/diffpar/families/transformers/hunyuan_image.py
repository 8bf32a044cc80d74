"""Context- and tensor-parallel plans for HunyuanImage 2.1 (`HunyuanImageTransformer2DModel`); diffusers ships
neither. The blocks are HunyuanVideo's (double- and single-stream, a token refiner on the prompt), so the plans
follow `hunyuan_video.py`; what differs is where the prompt can be cut.

Plan: image and text tokens are split where they enter the first block, the RoPE table (image tokens only) as it
leaves `rope`; gather after `proj_out`. The token refiner (and the ByT5 projection, with the reordering of valid
tokens first) run before the split, on the whole prompt.

The forward builds one key-padding mask over [image tokens, text tokens]. Two forward changes, undone on detach:
1. Where the first block is entered (a torch pre-hook, which runs before diffusers' split hook), the text is cut
   to its real tokens (as many as `hunyuan_video.text_tokens_to_keep` says: padded text tokens are keys every
   other token ignores). Cutting here, not after the refiner, keeps the ByT5 reordering (which indexes the
   refined prompt by the whole mask) intact.
2. Each block's attention gets `HunyuanImageContextParallelAttnProcessor`: the mask is cut to the kept text, an
   all-True mask becomes no mask, and a real padding mask under plain Ulysses is laid out in the order Ulysses
   gathers keys (`hunyuan_video.mask_for_sharded_keys`).
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.hunyuan_video import (
    hunyuan_video_tp_plan,
    mask_for_sharded_keys,
    text_tokens_to_keep,
)
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import register_tp_plan

_BLOCK_STACKS = ("transformer_blocks", "single_transformer_blocks")
_LABEL = "HunyuanImage"


def _processor_class(kept: dict):
    from diffusers.models.transformers.transformer_hunyuanimage import HunyuanImageAttnProcessor

    class HunyuanImageContextParallelAttnProcessor(HunyuanImageAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if attention_mask is not None and self._parallel_config is not None:
                whole_text, keep = kept.get("text_whole"), kept.get("text_tokens")
                if whole_text is not None and keep is not None and keep < whole_text:
                    # The mask covers [all image, all text]; the blocks see [all image, the first `keep` text].
                    attention_mask = attention_mask[..., : attention_mask.shape[-1] - whole_text + keep]
                attention_mask = mask_for_sharded_keys(
                    attention_mask, hidden_states.shape[1], encoder_hidden_states.shape[1], self._parallel_config,
                    keep,
                )
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    return HunyuanImageContextParallelAttnProcessor


def _first_stack(model) -> str:
    first = next((stack for stack in _BLOCK_STACKS if len(getattr(model, stack))), None)
    if first is None:
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    return first


def prepare_hunyuan_image(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_hunyuanimage import HunyuanImageAttnProcessor

    kept: dict = {}
    replace_attention_processors(model, {HunyuanImageAttnProcessor: _processor_class(kept)}, handle, name,
                                 type(model).__name__, within=_BLOCK_STACKS)

    def cut_prompt(module, args, kwargs):
        # Block call: (hidden_states, encoder_hidden_states, temb, attention_mask=..., image_rotary_emb=...).
        args = list(args)
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        mask = kwargs.get("attention_mask")
        whole = text.shape[1]
        keep = whole if mask is None else text_tokens_to_keep(mask[:, 0, 0, -whole:], config, _LABEL)
        kept["text_whole"], kept["text_tokens"] = whole, keep
        if keep == whole:
            return None
        if "encoder_hidden_states" in kwargs:
            kwargs["encoder_hidden_states"] = text[:, :keep]
        else:
            args[1] = text[:, :keep]
        return tuple(args), kwargs

    removers = []
    handle.add(f"{name}: cut prompt padding at the first block", lambda: [r.remove() for r in removers])
    first = getattr(model, _first_stack(model))[0]
    removers.append(first.register_forward_pre_hook(cut_prompt, with_kwargs=True))


@register_cp_plan("HunyuanImageTransformer2DModel", prepare=prepare_hunyuan_image)
def hunyuan_image_cp_plan(model) -> dict:
    tokens = split_input(split_dim=1, expected_dims=3)
    rope = split_input(split_dim=0, expected_dims=2, split_output=True)
    return {
        "rope": {0: rope, 1: rope},
        f"{_first_stack(model)}.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


# The same blocks, modulation and token refiner as HunyuanVideo.
register_tp_plan("HunyuanImageTransformer2DModel")(hunyuan_video_tp_plan)
