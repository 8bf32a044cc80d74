"""Context- and tensor-parallel plans for GLM-Image (`GlmImageTransformer2DModel`); diffusers ships neither.

Plan: the text (glyph) and image tokens are cut where they enter the first block (the prior-token embedding is
added to the image tokens before it), the image RoPE table (cos, sin) at every block (the forward passes it whole
to each), and the image tokens gathered after `proj_out`. Joint attention [text, image] applies RoPE to the image
part only, by local lengths, and the blocks' norms, MLPs and projections take a stream of 0 tokens.

How the tokens are cut, per forward (`choose_token_cut`, every rank decides the same from the shapes):
- per stream (as diffusers' split hooks cut them: `tensor_split` sizes, even where the degree divides): the
  default, kept wherever it can run, since it was the only cut before and is as balanced as any where it runs;
- over the joint sequence [text, image]: the index range [0, T + I) in equal contiguous pieces, rank r keeping the
  text and image tokens that fall in its piece (rank 0 the text, the others image tokens only). Used where the
  per-stream cut cannot run: fewer text tokens than ranks (with guidance, the unconditional call's glyph text is
  ONE token), or a stream the degree does not divide on a layout without an uneven split (Ulysses x Ring, 0.36)
  while T + I divides. Every rank's joint length then differs by at most one (equal where the degree divides
  T + I), so Ulysses' all-to-all and Ring's gathers see the chunks they always do; the gathered keys stay in the
  order [text, image] (attention does not depend on key order) and queries come back in place.
The hooks are ours (torch pre-hooks on the blocks, a forward hook on `proj_out`), not diffusers' split hooks, so
that one forward can take either cut; where joint lengths differ the call switches to diffusers' uneven attention
path, as compat's split check does for planned hooks. What neither cut can run is refused naming text and image
tokens.

The KV cache of image editing works on shards too: a condition-image pass stores this rank's keys and values (all
heads, before the all-to-all), and a later pass prepends them to its own; attention takes keys in any order, so the
gathered set is the whole one. (Under an uneven split the condition pass, whose prompt is empty, is refused: that
path is not checked with the cache.)

Mask: the processor turns a (batch, text) mask into an additive (query x key) one of +1 where both tokens are real.
An all-ones mask adds the same constant to every score (softmax ignores it), so `GlmImageContextParallelAttnProcessor`
drops it (exact); a mask with padding is refused under context parallelism (its query-by-key form has no split
diffusers' context-parallel attention can take). Undone on detach.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffpar.compat.diffusers_cp import uneven_path_for
from diffpar.compat.diffusers_cp_group import token_shards
from diffpar.engines.tp_shard import GATHER
from diffpar.errors import UnsupportedError
from diffpar.families.registry import register_cp_plan
from diffpar.families.transformers.attention_processors import replace_attention_processors
from diffpar.families.transformers.tp_plans import ATTN_ATTRS, TensorParallelPlan, present, register_tp_plan


def _processor_class():
    from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor

    class GlmImageContextParallelAttnProcessor(GlmImageAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None,
                     kv_cache=None):
            if attention_mask is not None and self._parallel_config is not None:
                if not bool((attention_mask != 0).all()):
                    raise UnsupportedError(
                        "GLM-Image with context parallelism: the text attention_mask marks padded tokens; the model "
                        "turns it into a query-by-key mask, which diffusers' context-parallel attention cannot split. "
                        "Pass the prompt without padding (attention_mask=None), or run without ulysses_size / "
                        "ring_size (tp_size works with any mask)."
                    )
                attention_mask = None  # all ones: +1 on every score, which softmax ignores
            if hidden_states.shape[1] == 0:  # a joint cut can leave a rank text only: no image token to rotate
                image_rotary_emb = None  # (diffusers' apply_rotary_emb cannot reshape an empty part)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                    kv_cache)

    return GlmImageContextParallelAttnProcessor


def _refuse_empty_prompt_uneven(config):
    """A torch pre-hook on the first block, before the cut: a call with an empty prompt (the condition-image pass of
    image editing, which fills the KV cache) under an uneven split is refused, as it was when diffusers' split hooks
    cut the tokens (they cannot cut an empty sequence); the cache on that path is unchecked."""
    degree = config.cp_degree

    def check(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if text is None or text.shape[1] or hidden is None:
            return
        uneven = config.ulysses_anything or config.ring_anything or hidden.shape[1] % degree
        if uneven:
            raise UnsupportedError(
                f"GLM-Image with context parallelism: this call (a condition-image pass of image editing) has an "
                f"empty prompt (0 text tokens) and {hidden.shape[1]} image tokens, which need an uneven split "
                f"(ulysses_anything / ring_anything, or image tokens {degree} ranks do not divide); the edit KV cache "
                f"is not supported on that path. Use condition images whose token count divides by {degree}, "
                f"without *_anything."
            )

    return check


# -- which tokens each rank holds ---------------------------------------------------------------------------------


def _sizes(length: int, parts: int) -> list[int]:
    """torch.tensor_split's sizes (diffusers' cut): the first `length % parts` parts one longer."""
    return [length // parts + (1 if i < length % parts else 0) for i in range(parts)]


def _ranges(sizes: list[int]) -> tuple[tuple[int, int], ...]:
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return tuple((a, a + n) for a, n in zip(starts, sizes))


@dataclass(frozen=True)
class TokenCut:
    """The text and image tokens each context-parallel rank holds in one forward: per rank a (start, stop) range of
    each stream. `joint`: cut over [text, image] together rather than per stream."""

    text: tuple[tuple[int, int], ...]
    image: tuple[tuple[int, int], ...]
    joint: bool

    def text_counts(self) -> list[int]:
        return [b - a for a, b in self.text]

    def image_counts(self) -> list[int]:
        return [b - a for a, b in self.image]

    def joint_lengths(self) -> list[int]:
        return [t + i for t, i in zip(self.text_counts(), self.image_counts())]

    def even(self) -> bool:
        """Whether every rank's joint sequence has the same length (attention needs no uneven path)."""
        return len(set(self.joint_lengths())) == 1


def stream_cut(text_tokens: int, image_tokens: int, parts: int) -> TokenCut:
    """Each stream cut on its own, as diffusers' split hooks cut it."""
    return TokenCut(_ranges(_sizes(text_tokens, parts)), _ranges(_sizes(image_tokens, parts)), joint=False)


def joint_cut(text_tokens: int, image_tokens: int, parts: int) -> TokenCut:
    """[0, text + image) in contiguous pieces of `tensor_split` sizes; each rank keeps the tokens of each stream in
    its piece."""
    pieces = _ranges(_sizes(text_tokens + image_tokens, parts))
    text = tuple((min(a, text_tokens), min(b, text_tokens)) for a, b in pieces)
    image = tuple((max(a, text_tokens) - text_tokens, max(b, text_tokens) - text_tokens) for a, b in pieces)
    return TokenCut(text, image, joint=True)


def choose_token_cut(text_tokens: int, image_tokens: int, parts: int, uneven_ok: bool) -> TokenCut | None:
    """The cut for one forward, or None where none can run. `uneven_ok`: attention may take joint lengths that
    differ per rank (diffusers' uneven path is configured or taken automatically on this layout and release).

    The per-stream cut runs where each stream divides, or is uneven with at least one token per rank and
    `uneven_ok`; it is kept there (the existing behaviour). Otherwise the joint cut: where the degree divides
    text + image, or `uneven_ok` and every rank gets a token."""
    def runs(length: int) -> bool:
        return length % parts == 0 or (uneven_ok and length >= parts)

    if runs(text_tokens) and runs(image_tokens):
        return stream_cut(text_tokens, image_tokens, parts)
    if runs(text_tokens + image_tokens):
        return joint_cut(text_tokens, image_tokens, parts)
    return None


def _refuse_cut(text_tokens: int, image_tokens: int, parts: int, cp_config):
    joint = text_tokens + image_tokens
    if joint < parts:
        why = f"together they are fewer than the {parts} ranks"
        fix = "Use fewer context-parallel ranks or a larger image."
    else:
        multiple = -(-joint // parts) * parts
        why = (f"{joint} is not a multiple of {parts}, and this layout (ulysses {cp_config.ulysses_degree} x ring "
               f"{cp_config.ring_degree}) has no uneven split on the installed diffusers")
        fix = (f"Choose a prompt or image size that gives a multiple of {parts} text + image tokens (e.g. "
               f"{multiple}), or use ulysses_size or ring_size alone (on diffusers 0.38+ their uneven split takes any "
               f"length).")
    raise UnsupportedError(
        f"GLM-Image with context parallelism: this call has {text_tokens} text (glyph) tokens and {image_tokens} "
        f"image tokens to split over {parts} ranks; neither each stream nor the joint sequence splits, as {why}. "
        f"{fix}"
    )


# -- hooks ----------------------------------------------------------------------------------------------------


class _CallCut:
    """The cut of the forward in progress, set at the first block, read at every block (RoPE rows) and at
    `proj_out` (the gather)."""

    def __init__(self):
        self.cut: TokenCut | None = None
        self.image_tokens = 0  # the whole image sequence (the RoPE table's length)
        self.rank = 0
        self.group = None


class _BlockArguments:
    """A transformer block's forward arguments by name, passed by position or keyword."""

    def __init__(self, block: torch.nn.Module):
        self.names = list(inspect.signature(type(block).forward).parameters)[1:]

    def get(self, name: str, args, kwargs):
        if name in kwargs:
            return kwargs[name]
        index = self.names.index(name)
        return args[index] if index < len(args) else None

    def replace(self, values: dict, args, kwargs):
        args, kwargs = list(args), dict(kwargs)
        for name, value in values.items():
            index = self.names.index(name)
            if name not in kwargs and index < len(args):
                args[index] = value
            else:
                kwargs[name] = value
        return tuple(args), kwargs


def _parallel_config_of(model):
    return model.transformer_blocks[0].attn1.processor._parallel_config


def _cut_tokens_hook(model, state: _CallCut):
    """Pre-hook of the first block: choose this forward's cut, take this rank's text and image tokens, and switch
    the call to diffusers' uneven attention path where joint lengths differ."""
    arguments = _BlockArguments(model.transformer_blocks[0])

    def hook(module, args, kwargs):
        state.cut = None
        parallel_config = _parallel_config_of(model)
        if parallel_config is None:
            return None
        cp = parallel_config.context_parallel_config
        hidden = arguments.get("hidden_states", args, kwargs)
        text = arguments.get("encoder_hidden_states", args, kwargs)
        text_tokens, image_tokens = text.shape[1], hidden.shape[1]
        shards = token_shards(parallel_config)
        configured = bool(getattr(cp, "ulysses_anything", False) or getattr(cp, "ring_anything", False))
        path = None if configured else uneven_path_for(cp)
        cut = choose_token_cut(text_tokens, image_tokens, shards.size, configured or path is not None)
        if cut is None:
            _refuse_cut(text_tokens, image_tokens, shards.size, cp)
        if not cut.even() and not configured:
            setattr(cp, path, True)  # this call only: the model's pre-hook puts the configured value back
        state.cut, state.image_tokens, state.rank, state.group = cut, image_tokens, shards.rank, shards.group
        (t0, t1), (i0, i1) = cut.text[shards.rank], cut.image[shards.rank]
        return arguments.replace({"hidden_states": hidden[:, i0:i1], "encoder_hidden_states": text[:, t0:t1]},
                                 args, kwargs)

    return hook


def _rope_rows_hook(block, state: _CallCut):
    """Pre-hook of every block: this rank's rows of the whole image RoPE table (cos, sin)."""
    arguments = _BlockArguments(block)

    def hook(module, args, kwargs):
        rope = arguments.get("image_rotary_emb", args, kwargs)
        if state.cut is None or not isinstance(rope, (tuple, list)):
            return None
        i0, i1 = state.cut.image[state.rank]
        rows = [t[i0:i1] if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[0] == state.image_tokens
                else t for t in rope]
        return arguments.replace({"image_rotary_emb": type(rope)(rows)}, args, kwargs)

    return hook


def _gather_image_hook(state: _CallCut):
    """Forward hook of `proj_out`: every rank's image tokens, in order (per-rank counts known from the cut: padded
    to the longest, all-gathered, trimmed)."""

    def hook(module, args, output):
        cut, state.cut = state.cut, None
        if cut is None:
            return None
        counts = cut.image_counts()
        longest = max(counts)
        local = output.contiguous()
        if local.shape[1] < longest:
            pad = list(local.shape)
            pad[1] = longest - local.shape[1]
            local = torch.cat([local, local.new_zeros(pad)], dim=1)
        chunks = [torch.empty_like(local) for _ in counts]
        dist.all_gather(chunks, local, group=state.group)
        return torch.cat([c[:, :n] for c, n in zip(chunks, counts)], dim=1)

    return hook


def prepare_glm_image(model, config, handle, name: str) -> None:
    from diffusers.models.transformers.transformer_glm_image import GlmImageAttnProcessor

    replace_attention_processors(model, {GlmImageAttnProcessor: _processor_class()}, handle, name,
                                 type(model).__name__)
    removers = []
    handle.add(f"{name}: token cut, RoPE rows and image gather hooks", lambda: [r.remove() for r in removers])
    first = model.transformer_blocks[0]
    removers.append(first.register_forward_pre_hook(_refuse_empty_prompt_uneven(config), with_kwargs=True))
    state = _CallCut()
    # Registration order is call order on the first block: the cut (which sets `state`) before its RoPE rows.
    removers.append(first.register_forward_pre_hook(_cut_tokens_hook(model, state), with_kwargs=True))
    for block in model.transformer_blocks:
        removers.append(block.register_forward_pre_hook(_rope_rows_hook(block, state), with_kwargs=True))
    removers.append(model.proj_out.register_forward_hook(_gather_image_hook(state)))


@register_cp_plan(
    "GlmImageTransformer2DModel", prepare=prepare_glm_image,
    hook_splits=("transformer_blocks.0(hidden_states, encoder_hidden_states: per stream, or over the joint "
                 "[text, image] sequence)", "transformer_blocks.*(image_rotary_emb rows)"),
    hook_gathers=("proj_out (image tokens)",),
)
def glm_image_cp_plan(model) -> dict:
    if len(model.transformer_blocks) == 0:
        raise UnsupportedError(f"{type(model).__name__} has no transformer blocks to parallelize.")
    return {}  # no diffusers hooks: the prepare step's hooks cut the tokens per forward (module docstring)


@register_tp_plan("GlmImageTransformer2DModel")
def glm_image_tp_plan(model) -> TensorParallelPlan:
    block = {
        "attn1.to_q": "colwise", "attn1.to_k": "colwise", "attn1.to_v": "colwise", "attn1.to_out.0": "rowwise",
        "ff.net.0.proj": "colwise", "ff.net.2": "rowwise",  # one MLP for both streams
        "norm1.linear": GATHER,
    }
    linears = present(model, block, "transformer_blocks")
    # The glyph (text) and prior-token projections: MLPs on the hidden width, split like the blocks' MLP.
    for mlp in ("glyph_projector", "prior_projector"):
        linears[f"{mlp}.net.0.proj"] = "colwise"
        linears[f"{mlp}.net.2"] = "rowwise"
    linears["norm_out.linear"] = GATHER
    if isinstance(getattr(model, "prior_token_embedding", None), torch.nn.Embedding):
        # the prior tokens' table (42M of 2.9B parameters): split by width, rows gathered (whole, it kept 0.508 / 0.261)
        linears["prior_token_embedding"] = GATHER
    return TensorParallelPlan(linears=linears, attention_attrs={"transformer_blocks.*.attn1": ATTN_ATTRS})
