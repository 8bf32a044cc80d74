"""Context-parallel plan for HunyuanVideo (`HunyuanVideoTransformer3DModel`); diffusers ships none.

Plan: the video tokens and the refined text tokens are split where they enter the first block, the RoPE table as
it leaves `rope`; blocks work on shards; gather after `proj_out`. The token refiner runs before the split, on the
whole prompt (it pools over the prompt), and its attention keeps diffusers' default processor.

The forward builds one key-padding mask over [video tokens, text tokens]. After the split each rank holds
[its video shard, its text shard], so the whole mask, in its original order, no longer matches the keys. Two
small forward changes, both undone on detach, keep every mode exact:

1. The token refiner's output is cut to the prompt's real tokens (text is right-padded by the pipeline's
   tokenizer). Padded text tokens are keys every other token ignores, so dropping them changes nothing, and the
   mask then masks nothing. For plain Ulysses with an even split, the kept length is rounded up to a multiple of
   the degree, so a few padded tokens may remain (handled by 2).
2. Each block's attention gets `HunyuanVideoContextParallelAttnProcessor`: an all-True mask becomes no mask (the
   ring cannot take one; `ring_anything` rejects any mask), and a real padding mask under plain Ulysses is laid
   out in the order Ulysses gathers keys: [video_0, text_0, video_1, text_1, ...].

Not supported: Ring (or *_anything) with prompts of different lengths in one batch, and the image-to-video
"token_replace" variant (its first-frame tokens are addressed by position in the whole sequence).
"""
from __future__ import annotations


import torch

from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks
from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.errors import UnsupportedError
from diffpar.patch import Patch
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.sd3 import replace_attention_processors

_BLOCK_STACKS = ("transformer_blocks", "single_transformer_blocks")


def _processor_class():
    """Built lazily: the base class comes from the installed diffusers."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    class HunyuanVideoContextParallelAttnProcessor(HunyuanVideoAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if attention_mask is not None and self._parallel_config is not None:
                attention_mask = mask_for_sharded_keys(
                    attention_mask, hidden_states.shape[1], encoder_hidden_states.shape[1], self._parallel_config
                )
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    return HunyuanVideoContextParallelAttnProcessor


def mask_for_sharded_keys(mask: torch.Tensor, video_tokens: int, text_tokens: int, parallel_config):
    """The model's (B, 1, 1, N) mask over [all video, all text] -> the mask for the keys attention sees here."""
    if bool(mask.all()):
        return None
    cp = parallel_config.context_parallel_config
    degree = cp.ulysses_degree
    even_ulysses = cp.ring_degree == 1 and not getattr(cp, "ulysses_anything", False)
    if not even_ulysses or mask.shape[-1] != degree * (video_tokens + text_tokens):
        # Prevented earlier by trimming the prompt; kept so a wrong layout can never pass silently.
        raise UnsupportedError(
            "HunyuanVideo: a text padding mask reached attention in a layout diffpar cannot reorder (ring attention "
            "or an uneven split). Pass prompts of equal length in one batch, or use ulysses_size without "
            "ulysses_anything."
        )
    batch = mask.shape[0]
    flat = mask.reshape(batch, -1)
    video = flat[:, : degree * video_tokens].reshape(batch, degree, video_tokens)
    text = flat[:, degree * video_tokens:].reshape(batch, degree, text_tokens)
    return torch.cat([video, text], dim=-1).reshape(batch, 1, 1, -1)


def text_tokens_to_keep(text_mask: torch.Tensor, config) -> int:
    """How many leading text tokens the blocks must see; raises where no exact layout exists."""
    valid = text_mask.bool()
    total = valid.shape[1]
    counts = valid.sum(dim=1)
    longest, shortest = int(counts.max()), int(counts.min())
    right_padded = torch.equal(valid, torch.arange(total, device=valid.device)[None] < counts[:, None])
    degree = config.cp_degree
    masks_ok = context_parallel_attention_takes_masks()
    if config.ring_degree == 1 and not config.ulysses_anything and masks_ok:
        # Plain Ulysses, even split: any leftover padding is laid out by the processor.
        if not right_padded or longest == 0:
            return total
        return min(total, -(-longest // degree) * degree)

    # Otherwise no padding may remain: what cannot apply a mask, and what to do instead.
    if config.ring_degree > 1:
        mode, other = "ring attention", "use ulysses_size instead of ring_size"
    elif config.ulysses_anything:
        mode, other = "ulysses_anything", "use ulysses_size without ulysses_anything"
    else:
        mode, other = "diffusers' context-parallel attention in this release", "upgrade diffusers (0.37+ takes masks)"
    if not right_padded or shortest != longest:
        raise UnsupportedError(
            f"HunyuanVideo with context parallelism: the prompts in this batch have {sorted(counts.tolist())} real "
            f"text tokens (of {total}){'' if right_padded else ', not all at the start'}, so a padding mask would be "
            f"needed, and {mode} cannot apply one across ranks. Run prompts of different lengths in separate calls, "
            f"or {other}."
        )
    if longest == 0:
        raise UnsupportedError("HunyuanVideo: the prompt has no real text tokens (its attention mask is all zero).")
    if longest % degree and not (config.ring_anything or config.ulysses_anything):
        uneven = "set ring_anything=True (uneven splits), or " if config.ring_degree > 1 else ""
        raise UnsupportedError(
            f"HunyuanVideo with context parallelism: the prompt has {longest} real text tokens, which {degree} ranks "
            f"cannot split evenly, and padding it would need a mask {mode} cannot apply. To run it, {uneven}{other}."
        )
    return longest


def _trim_prompt_padding(config):
    def wrapper(wrapped, instance, args, kwargs):
        refined = wrapped(*args, **kwargs)
        # HunyuanVideoTokenRefiner.forward(hidden_states, timestep, attention_mask=None)
        text_mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        if text_mask is None:
            return refined
        keep = text_tokens_to_keep(text_mask, config)
        return refined if keep == refined.shape[1] else refined[:, :keep]

    return wrapper


def prepare_hunyuan_video(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    label = type(model).__name__
    replace_attention_processors(
        model, {HunyuanVideoAttnProcessor2_0: _processor_class()}, handle, name, label, within=_BLOCK_STACKS
    )
    patches: list[Patch] = []
    handle.add(f"{name}: cut prompt padding after the token refiner", lambda: [p.undo() for p in patches])
    patches.append(Patch(model.context_embedder, "forward", _trim_prompt_padding(config),
                         label=f"{label}.context_embedder.forward"))


@register_cp_plan("HunyuanVideoTransformer3DModel", prepare=prepare_hunyuan_video)
def hunyuan_video_cp_plan(model) -> dict:
    if getattr(model.config, "image_condition_type", None) == "token_replace":
        raise UnsupportedError(
            f"{type(model).__name__} with image_condition_type='token_replace' (HunyuanVideo image-to-video): its "
            "blocks treat the first frame's tokens by their position in the whole sequence, which a sequence split "
            "moves. Context parallelism supports the text-to-video and 'latent_concat' variants."
        )
    first = next((stack for stack in _BLOCK_STACKS if len(getattr(model, stack))), None)
    if first is None:
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    tokens = split_input(split_dim=1, expected_dims=3)
    rope = split_input(split_dim=0, expected_dims=2, split_output=True)
    return {
        "rope": {0: rope, 1: rope},
        f"{first}.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }
