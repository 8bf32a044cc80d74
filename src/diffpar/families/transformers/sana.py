"""Sana (`SanaTransformer2DModel`): context- and tensor-parallel plans; diffusers ships neither.

CP plan: the image tokens are split as they leave `patch_embed` (a sin-cos positional embedding, where the config
has one, is added inside it per token: splitting its output is exact); gather after `proj_out`. Three parts of
each block see more than the rank's tokens, and each is made exact:

- self-attention is ReLU *linear* attention: its key-value summary (a (head_dim + 1) x head_dim matrix per head)
  is a sum over all tokens, so each rank sums its own and one all-reduce adds them
  (`ContextParallelSanaLinearAttnProcessor`; no all-to-all, and a cost independent of the image size);
- cross-attention attends from the shard to the whole prompt, with its mask, locally;
- the feed-forward (`GLUMBConv`) has a 3 x 3 depthwise convolution over the 2-D token grid: a token needs its
  neighbours one row above and below, which may sit on other ranks. Each block's `ff` gets a forward of its
  own (`HaloFeedForward`): every rank shares its first and last (width + 1) tokens with the others (one all-gather),
  lays its shard and those halo tokens out at their rows of the image, runs the original feed-forward there and
  keeps its own tokens. A forward pre-hook on each block hands the block (1, shard length) as its grid, so the
  block's reshape to (height, width) works on a shard, and records the true grid for the wrapper.
All three are undone on detach.

TP plan: self- and cross-attention by heads, the caption projection by width, the AdaLN-single modulation
gathered, the feed-forward's convolutions by channels (1x1 colwise / rowwise, the depthwise 3x3 by channel).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from diffpar.compat.diffusers_cp_group import token_shards
from diffpar.compat.diffusers_cp_hooks import gather_output, split_input
from diffpar.engines.tp_shard import DEPTHWISE, GATHER, Packed, even_split
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import check_generic_attention, prepare_generic_attention
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


class HaloFeedForward:
    """A block's feed-forward on a token shard of a (height, width) grid, given the block's (B, C, 1, n) view of
    the shard; outside context parallelism (no grid recorded) it is the original forward. Installed as the
    feed-forward's own `forward` (not a wrapping module), so module paths stay what the tensor-parallel plan
    names (`ff.conv_inverted`, ...) in the hybrid."""

    def __init__(self, ff: torch.nn.Module, grid: dict):
        self.ff = ff
        self.grid = grid  # set by the block's pre-hook for this call: height, width, shards

    def run_ff(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.ff).forward(self.ff, x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.grid.get("shape")
        if grid is None:
            return self.run_ff(x)
        height, width = grid
        shards = self.grid["shards"]
        batch, channels, _, local = x.shape
        tokens = x.flatten(2)  # (B, C, n)
        counts = even_split(height * width, shards.size)  # how diffusers' split hooks cut the tokens
        start = sum(counts[:shards.rank])
        halo = width + 1  # a 3 x 3 kernel reaches one row and one column away: width + 1 tokens
        edge = min(local, halo)
        mine = torch.cat([F.pad(tokens[..., :edge], (0, halo - edge)), F.pad(tokens[..., local - edge:],
                                                                            (0, halo - edge))], dim=-1)
        everyone = [torch.empty_like(mine) for _ in range(shards.size)]
        dist.all_gather(everyone, mine.contiguous(), group=shards.group)
        valid = [min(c, halo) for c in counts]
        before = [everyone[r][..., halo:halo + valid[r]] for r in range(shards.rank)]
        after = [everyone[r][..., :valid[r]] for r in range(shards.rank + 1, shards.size)]
        before = torch.cat(before, dim=-1)[..., -halo:] if before else tokens[..., :0]
        after = torch.cat(after, dim=-1)[..., :halo] if after else tokens[..., :0]
        extended = torch.cat([before, tokens, after], dim=-1)
        first = start - before.shape[-1]  # global index of extended[..., 0]
        top, bottom = first // width, (first + extended.shape[-1] - 1) // width
        rows = torch.zeros(batch, channels, (bottom - top + 1) * width, dtype=x.dtype, device=x.device)
        offset = first - top * width
        rows[..., offset:offset + extended.shape[-1]] = extended
        # Positions of those rows not filled hold zeros: only outputs this rank does not keep can see them.
        out = self.run_ff(rows.unflatten(-1, (bottom - top + 1, width)))
        keep = start - top * width
        return out.flatten(2)[..., keep:keep + local].unsqueeze(2)


def _block_grid_hook(block, grid: dict):
    def pre_hook(module, args, kwargs):
        config = block.attn1.processor._parallel_config if hasattr(block.attn1.processor, "_parallel_config") \
            else None
        if config is None:
            grid["shape"] = None
            return None
        names = ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
                 "height", "width")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        grid["shape"] = (bound["height"], bound["width"])
        grid["shards"] = token_shards(config)
        bound["height"], bound["width"] = 1, bound["hidden_states"].shape[1]
        return (), bound

    return pre_hook


def prepare_sana(model, config, handle, name: str) -> None:
    prepare_generic_attention(model, config, handle, name)
    wrapped, hooks = [], []

    def restore():
        for hook in hooks:
            hook.remove()
        for ff in wrapped:
            ff.__dict__.pop("forward", None)

    handle.add(f"{name}: feed-forward halo exchange", restore)
    for block in model.transformer_blocks:
        grid: dict = {}
        if "forward" in block.ff.__dict__:
            raise UnsupportedError(f"{type(model).__name__}: a block's feed-forward already has its forward "
                                   "replaced (by another tool); diffpar cannot add its halo exchange to it.")
        wrapped.append(block.ff)
        block.ff.forward = HaloFeedForward(block.ff, grid)
        hooks.append(block.register_forward_pre_hook(_block_grid_hook(block, grid), with_kwargs=True))


@register_cp_plan("SanaTransformer2DModel", prepare=prepare_sana)
def sana_cp_plan(model) -> dict:
    check_generic_attention(model, type(model).__name__)
    return {
        "patch_embed": {0: split_input(split_dim=1, expected_dims=3, split_output=True)},
        "proj_out": gather_output(gather_dim=1, expected_dims=3),
    }


@register_tp_plan("SanaTransformer2DModel")
def sana_tp_plan(model) -> TensorParallelPlan:
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "attn2.to_q": "colwise", "attn2.to_k": "colwise", "attn2.to_v": "colwise", "attn2.to_out.0": "rowwise",
    }
    linears = present(model, block, "transformer_blocks")
    # The feed-forward (GLUMBConv) by channels: conv_inverted (1x1) makes [value | gate] channels, each block split
    # over the ranks; the depthwise 3x3 keeps the same channels (each only reads itself, so the token halo of
    # context parallelism is unchanged); the local chunk(2) then pairs this rank's values with their gates, and
    # conv_point (1x1) sums over the ranks' channels.
    if len(model.transformer_blocks):
        hidden = model.transformer_blocks[0].ff.conv_point.in_channels
        linears["transformer_blocks.*.ff.conv_inverted"] = Packed("colwise", (hidden, hidden))
        linears["transformer_blocks.*.ff.conv_depth"] = Packed(DEPTHWISE, (hidden, hidden))
        linears["transformer_blocks.*.ff.conv_point"] = "rowwise"
    # Sana 1.5 normalizes queries and keys over all heads (qk_norm="rms_norm_across_heads").
    norms = {f"{attn}.{n}": None for attn in ("attn1", "attn2") for n in ("norm_q", "norm_k")}
    linears["caption_projection.linear_1"] = "colwise"
    linears["caption_projection.linear_2"] = "rowwise"
    linears["time_embed.linear"] = GATHER
    return TensorParallelPlan(
        linears=linears,
        attention_attrs={"transformer_blocks.*.attn1": ATTN_ATTRS, "transformer_blocks.*.attn2": ATTN_ATTRS},
        sharded_norms=tuple(present(model, norms, "transformer_blocks")),
    )
