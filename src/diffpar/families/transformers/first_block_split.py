"""Context-parallel plans that split the tokens as they enter the first block.

`blocks_split_plan`: the hidden tokens alone are split at the first block of a stack (with optional per-token
tables split alongside) and gathered after the last block or an output layer. `first_and_every_block`: the entries that split some
inputs at the first block and per-token tables at every block.

What the video transformers that split both streams at the first block share (HunyuanVideo 1.5, Mochi,
EasyAnimate): the context-parallel plan (RoPE table split with the tokens, both streams split at
`transformer_blocks.0`, gathered after `proj_out`), and the `prepare=` step that swaps the blocks' attention
processors and, where the prompt comes padded, cuts that padding off before the split.

Why cut first: the padding after the longest prompt's last real token is masked for every sample, so dropping it
is exact, and the split then shares out only real prompt tokens (`hunyuan_video.text_tokens_to_keep` decides how
many stay). The pre-hook wraps the first block's call and the split hooks wrap its forward, so it runs first.
"""
from __future__ import annotations

from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.errors import UnsupportedError
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.hunyuan_video import text_tokens_to_keep


def blocks_split_plan(model, stack: str = "transformer_blocks", gather_after: str | None = None,
                      what: str = "transformer blocks", tables: dict | None = None) -> dict:
    """The CP plan: `tables` (plan entries of per-token tables, e.g. RoPE) first, the hidden tokens split as they
    enter `{stack}.0`, gathered after `gather_after` (default: the stack's last block). `what` names the stack in
    the refusal of a model without blocks."""
    blocks = len(getattr(model, stack))
    if not blocks:
        raise UnsupportedError(f"{type(model).__name__} has no {what} to parallelize.")
    last = gather_after or f"{stack}.{blocks - 1}"
    if last == f"{stack}.0":  # one block: a plan holds one entry per name, so the gather goes under the wildcard
        last = f"{stack}.*"
    plan = {**(tables or {}), f"{stack}.0": {"hidden_states": split_input(split_dim=1, expected_dims=3)}}
    if last in plan:
        raise UnsupportedError(f"{type(model).__name__}: its one block takes a per-token table and the gather at "
                               f"the same place ({last}); diffpar cannot split it.")
    plan[last] = gather_output(gather_dim=1, expected_dims=3)
    return plan


def first_and_every_block(stack: str, blocks: int, first: dict, every: dict) -> dict:
    """Plan entries that split the `first` inputs at `{stack}.0` and the `every` inputs (per-token tables every
    block receives) at each block; with one block both sit under `{stack}.*`, since a plan has one entry per
    name."""
    if blocks == 1:
        return {f"{stack}.*": {**first, **every}}
    return {f"{stack}.0": first, f"{stack}.*": every}


def first_block_split_plan(model, rope: str, rope_dims: int) -> dict:
    """The CP plan: the RoPE module's two tables (`rope`, each `rope_dims`-D, tokens first) split with the tokens,
    the video and prompt tokens split as they enter the first block, the video gathered after `proj_out`."""
    if not len(model.transformer_blocks):
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    tokens = split_input(split_dim=1, expected_dims=3)
    table = split_input(split_dim=0, expected_dims=rope_dims, split_output=True)
    return {
        rope: {0: table, 1: table},
        "transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


def cut_prompt_padding(config, kept: dict, mask_name: str, check_mask=None, label: str = "HunyuanVideo"):
    """Pre-hook of the first block, block(hidden_states, encoder_hidden_states, temb, <mask_name>, ...): records
    this call's video length and the prompt length after the cut in `kept` (what the processors' masks cover) and
    passes the prompt cut to that length. `check_mask(mask)`, if given, refuses a mask the cut cannot serve;
    `label` names the model in a refusal."""
    names = ("hidden_states", "encoder_hidden_states", "temb", mask_name)

    def hook(module, args, kwargs):
        values = dict(zip(names, args))
        values.update({k: v for k, v in kwargs.items() if k in names})
        mask, text = values.get(mask_name), values["encoder_hidden_states"]
        kept["video_tokens"] = values["hidden_states"].shape[1]
        keep = text.shape[1]
        if mask is not None:
            if check_mask is not None:
                check_mask(mask)
            keep = text_tokens_to_keep(mask, config, label)
        kept["text_tokens"] = keep
        if keep == text.shape[1]:
            return None
        if "encoder_hidden_states" in kwargs:
            return args, {**kwargs, "encoder_hidden_states": text[:, :keep]}
        return (*args[:1], text[:, :keep], *args[2:]), kwargs

    return hook


def prepare_first_block_split(model, handle, name: str, processors: dict[type, type], cut_hook=None) -> None:
    """Swap the blocks' attention processors (`processors`: diffusers' class -> ours) and, with `cut_hook`, install
    it as the first block's pre-hook; both undone on detach."""
    replace_attention_processors(model, processors, handle, name, type(model).__name__, within=("transformer_blocks",))
    if cut_hook is None:
        return
    hooks = []
    handle.add(f"{name}: cut prompt padding before the first block", lambda: [h.remove() for h in hooks])
    hooks.append(model.transformer_blocks[0].register_forward_pre_hook(cut_hook, with_kwargs=True))
