"""Context- and tensor-parallel plans for HunyuanVideo (`HunyuanVideoTransformer3DModel`); diffusers ships neither.

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
   out in the order Ulysses gathers keys: [video_0, text_0, video_1, text_1, ...], each part as long as the split
   cut it (unequal where a call whose video tokens do not divide took the uneven path by itself).

Image-to-video ("token_replace"): the blocks modulate the first latent frame's tokens (the first
`first_frame_num_tokens` of the video sequence) with their own timestep embedding, addressed as
`[:, :num_tokens]` of whatever sequence the block holds. After the split a rank holds video tokens
[start, end) of the whole sequence, so each block is called with the count of ITS tokens that lie in the first
frame, max(0, min(first, end) - start): a forward pre-hook per block rewrites `num_tokens`, knowing the whole
video length from `x_embedder` (which runs before the split) and the rank's shard from the split's own layout.

Not supported: Ring (or *_anything) with prompts of different lengths in one batch.
"""
from __future__ import annotations


import torch

from diffpar.compat.diffusers_cp import context_parallel_attention_takes_masks, uneven_split_option
from diffpar.compat.diffusers_cp_group import token_shards
from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.errors import UnsupportedError
from diffpar.patch import Patch
from diffpar.families.registry import register_cp_plan
from diffpar.engines.tp_shard import GATHER, Packed
from diffpar.families.transformers.sd3 import per_block, replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, DUAL_STREAM_BLOCK, TensorParallelPlan, register_tp_plan

_BLOCK_STACKS = ("transformer_blocks", "single_transformer_blocks")


def _processor_class(kept: dict):
    """Built lazily: the base class comes from the installed diffusers. `kept["text_tokens"]`: the text length the
    token refiner's output was cut to in this call (the mask covers [all video, that many text tokens])."""
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    class HunyuanVideoContextParallelAttnProcessor(HunyuanVideoAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                     image_rotary_emb=None):
            if attention_mask is not None and self._parallel_config is not None:
                attention_mask = mask_for_sharded_keys(
                    attention_mask, hidden_states.shape[1], encoder_hidden_states.shape[1], self._parallel_config,
                    kept.get("text_tokens"),
                )
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    return HunyuanVideoContextParallelAttnProcessor


def _parts(total: int, degree: int) -> list[int]:
    """Sizes of `total` split over `degree` ranks as diffusers cuts it (chunk when even, tensor_split when not)."""
    return [total // degree + (1 if r < total % degree else 0) for r in range(degree)]


def mask_for_sharded_keys(mask: torch.Tensor, video_tokens: int, text_tokens: int, parallel_config,
                          text_total: int | None = None):
    """The model's (B, 1, 1, N) mask over [all video, all text] -> the mask for the keys attention sees here.

    Ulysses gathers keys rank by rank, [video_0, text_0, video_1, text_1, ...], each part cut as the split hooks cut
    it (evenly, or unevenly where the call took the uneven path). `text_total`: the text length of this call
    (default: `text_tokens` on every rank)."""
    if bool(mask.all()):
        return None
    cp = parallel_config.context_parallel_config
    degree = cp.ulysses_degree
    total = mask.shape[-1]
    text_total = degree * text_tokens if text_total is None else text_total
    video_total = total - text_total
    if cp.ring_degree != 1 or video_total < 0:
        # Prevented earlier by trimming the prompt; kept so a wrong layout can never pass silently.
        raise UnsupportedError(
            "HunyuanVideo: a text padding mask reached attention in a layout diffpar cannot reorder (ring "
            "attention). Pass prompts of equal length in one batch, or use ulysses_size."
        )
    order, video_start, text_start = [], 0, video_total
    for v, t in zip(_parts(video_total, degree), _parts(text_total, degree)):
        order += list(range(video_start, video_start + v)) + list(range(text_start, text_start + t))
        video_start, text_start = video_start + v, text_start + t
    index = torch.tensor(order, device=mask.device)
    return mask.reshape(mask.shape[0], -1).index_select(1, index).reshape(mask.shape[0], 1, 1, -1)


def text_tokens_to_keep(text_mask: torch.Tensor, config, label: str = "HunyuanVideo") -> int:
    """How many leading text tokens the blocks must see; raises where no exact layout exists (`label`: the model
    named in the message)."""
    valid = text_mask.bool()
    total = valid.shape[1]
    counts = valid.sum(dim=1)
    longest, shortest = int(counts.max()), int(counts.min())
    right_padded = torch.equal(valid, torch.arange(total, device=valid.device)[None] < counts[:, None])
    degree = config.cp_degree
    masks_ok = context_parallel_attention_takes_masks()
    # Where the release splits this layout unevenly, a call whose length does not divide takes that path itself.
    uneven_ok = (config.ring_anything or config.ulysses_anything
                 or uneven_split_option(config.ulysses_degree, config.ring_degree) is not None)
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
            f"{label} with context parallelism: the prompts in this batch have {sorted(counts.tolist())} real "
            f"text tokens (of {total}){'' if right_padded else ', not all at the start'}, so a padding mask would be "
            f"needed, and {mode} cannot apply one across ranks. Run prompts of different lengths in separate calls, "
            f"or {other}."
        )
    if longest == 0:
        raise UnsupportedError(f"{label}: the prompt has no real text tokens (its attention mask is all zero).")
    if longest % degree and not uneven_ok:
        uneven = ("upgrade diffusers to 0.38+, which splits unevenly by itself (or set ring_anything=True there), or "
                  if config.ring_degree > 1 else "")
        raise UnsupportedError(
            f"{label} with context parallelism: the prompt has {longest} real text tokens, which {degree} ranks "
            f"cannot split evenly, and padding it would need a mask {mode} cannot apply. To run it, {uneven}{other}."
        )
    return longest


def _trim_prompt_padding(config, kept: dict):
    def wrapper(wrapped, instance, args, kwargs):
        refined = wrapped(*args, **kwargs)
        # HunyuanVideoTokenRefiner.forward(hidden_states, timestep, attention_mask=None)
        text_mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        keep = refined.shape[1] if text_mask is None else text_tokens_to_keep(text_mask, config)
        kept["text_tokens"] = keep
        return refined if keep == refined.shape[1] else refined[:, :keep]

    return wrapper


def first_frame_tokens_here(first_frame_tokens: int, video_tokens: int, shard: int, shards: int) -> int:
    """How many of shard `shard`'s video tokens (of `video_tokens` split over `shards` as the split hooks cut them)
    lie in the first `first_frame_tokens` of the whole sequence."""
    sizes = _parts(video_tokens, shards)
    start = sum(sizes[:shard])
    return max(0, min(first_frame_tokens - start, sizes[shard]))


def _split_first_frame_tokens(model, handle, name: str) -> None:
    """Token-replace blocks: `num_tokens` (first-frame tokens of the whole sequence) -> those of this rank's shard."""
    seen: dict = {}  # this call's whole video length, recorded before the split
    removers: list = []
    handle.add(f"{name}: first-frame token count per rank", lambda: [r.remove() for r in removers])

    def record_video_tokens(module, args, output):
        seen["video_tokens"] = output.shape[1]

    def rewrite_num_tokens(block, args, kwargs):
        parallel_config = getattr(model, "_parallel_config", None)
        in_kwargs = "num_tokens" in kwargs
        # Both token-replace blocks: forward(hidden_states, encoder_hidden_states, temb, attention_mask,
        # image_rotary_emb / freqs_cis, token_replace_emb, num_tokens).
        if parallel_config is None or "video_tokens" not in seen or (not in_kwargs and len(args) < 7):
            return None
        whole = kwargs["num_tokens"] if in_kwargs else args[6]
        shards = token_shards(parallel_config)
        here = first_frame_tokens_here(int(whole), seen["video_tokens"], shards.rank, shards.size)
        if in_kwargs:
            return args, {**kwargs, "num_tokens": here}
        return (*args[:6], here, *args[7:]), kwargs

    removers.append(model.x_embedder.register_forward_hook(record_video_tokens))
    for stack in _BLOCK_STACKS:
        for block in getattr(model, stack):
            removers.append(block.register_forward_pre_hook(rewrite_num_tokens, with_kwargs=True))


def prepare_hunyuan_video(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

    label = type(model).__name__
    kept: dict = {}  # this call's text length after the cut, for the processors' mask layout
    replace_attention_processors(
        model, {HunyuanVideoAttnProcessor2_0: _processor_class(kept)}, handle, name, label, within=_BLOCK_STACKS
    )
    patches: list[Patch] = []
    handle.add(f"{name}: cut prompt padding after the token refiner", lambda: [p.undo() for p in patches])
    patches.append(Patch(model.context_embedder, "forward", _trim_prompt_padding(config, kept),
                         label=f"{label}.context_embedder.forward"))
    if getattr(model.config, "image_condition_type", None) == "token_replace":
        _split_first_frame_tokens(model, handle, name)


@register_cp_plan("HunyuanVideoTransformer3DModel", prepare=prepare_hunyuan_video)
def hunyuan_video_cp_plan(model) -> dict:
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


def single_block_linears(model) -> dict:
    """Every single-stream block's split: attention heads and the MLP by columns, `proj_out` (over [attention output,
    MLP hidden]) by rows in two packed parts, the AdaLN modulation gathered."""
    linears = {}
    for index, block in enumerate(model.single_transformer_blocks):
        path = f"single_transformer_blocks.{index}"
        linears.update({
            f"{path}.attn.to_q": "colwise", f"{path}.attn.to_k": "colwise", f"{path}.attn.to_v": "colwise",
            f"{path}.proj_mlp": "colwise",
            # proj_out reads cat([attention output, MLP hidden]): two column-sharded streams.
            f"{path}.proj_out": Packed("rowwise", (block.attn.inner_dim, block.proj_mlp.out_features)),
            f"{path}.norm.linear": GATHER,
        })
    return linears


@register_tp_plan("HunyuanVideoTransformer3DModel")
def hunyuan_video_tp_plan(model) -> TensorParallelPlan:
    linears = per_block(model, "transformer_blocks", DUAL_STREAM_BLOCK)
    linears.update(single_block_linears(model))
    # The token refiner (a few blocks on the prompt, before the split): the same split of heads and MLP.
    refiner = {"attn.to_q": "colwise", "attn.to_k": "colwise", "attn.to_v": "colwise", "attn.to_out.0": "rowwise",
               "ff.net.0.proj": "colwise", "ff.net.2": "rowwise", "norm_out.linear": GATHER}
    refiner_stack = "context_embedder.token_refiner.refiner_blocks"
    if len(model.get_submodule(refiner_stack)):
        linears.update({f"{refiner_stack}.*.{k}": v for k, v in refiner.items()})
    linears["norm_out.linear"] = GATHER
    attrs = {f"{stack}.*.attn": ATTN_ATTRS for stack in (*_BLOCK_STACKS, refiner_stack)
             if len(model.get_submodule(stack))}
    return TensorParallelPlan(linears=linears, attention_attrs=attrs)
