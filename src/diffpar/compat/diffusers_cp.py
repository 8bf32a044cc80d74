"""Everything about diffusers' context-parallel machinery that differs between releases (0.36 onward).

Each feature is detected from what the installed release does (a constructor that refuses, a field that exists,
diffusers' own function run once on tiny CPU tensors), not from its version number or its source text. Shims are
installed by `patch.Patch` (plain functions torch.compile traces) while at least one parallel handle needs them
and removed with the last one. Plan entries and context-parallel hooks are in `diffusers_cp_hooks`.
"""
from __future__ import annotations

import dataclasses
import inspect
import threading
from functools import lru_cache

import diffusers
import torch
import torch.distributed as dist

from diffpar.errors import UnsupportedError
from diffpar.patch import Patch
from diffpar.compat import diffusers_cp_hooks, versions


def _need_native_cp():
    try:
        from diffusers.hooks.context_parallel import apply_context_parallel  # noqa: F401
        from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig  # noqa: F401
    except ImportError as exc:  # diffusers < 0.36
        raise UnsupportedError(
            f"diffusers {versions.version_of('diffusers')} has no native context parallelism (added in 0.36.0). "
            "Install diffusers>=0.36.0."
        ) from exc


@lru_cache(None)
def cp_config_fields() -> frozenset[str]:
    _need_native_cp()
    from diffusers.models._modeling_parallel import ContextParallelConfig

    return frozenset(f.name for f in dataclasses.fields(ContextParallelConfig) if not f.name.startswith("_"))


@lru_cache(None)
def supports_ulysses_and_ring() -> bool:
    """0.36 rejects ring_degree > 1 together with ulysses_degree > 1."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    try:
        ContextParallelConfig(ring_degree=2, ulysses_degree=2)
    except (ValueError, NotImplementedError):
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Detection by behaviour: diffusers' own functions run once on tiny CPU tensors, without collectives (their
# collective helpers are replaced in a private copy of the function's globals; diffusers' module is untouched).
# ---------------------------------------------------------------------------------------------------------


def _fake_parallel_config(ring_degree: int = 1, ulysses_degree: int = 1):
    """Stands in for a set-up ParallelConfig: what the probed functions read from it, and nothing else."""
    from types import SimpleNamespace

    cp = SimpleNamespace(ring_degree=ring_degree, ulysses_degree=ulysses_degree, ulysses_anything=False,
                         ring_anything=False, convert_to_fp32=True, _ring_local_rank=0,
                         _ring_mesh=SimpleNamespace(get_group=lambda: None))
    return SimpleNamespace(context_parallel_config=cp)


def _with_globals(fn, **replaced):
    """`fn` with some of its module globals replaced, in a copy: the module keeps its own."""
    import types

    copy = types.FunctionType(fn.__code__, {**fn.__globals__, **replaced}, fn.__name__, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _ring_accepts(ring_forward, layout: str) -> bool:
    """Run a ring attention forward over 2 simulated ranks holding the same keys, with a forward op whose LSE has
    `layout` ("3d": (B, S, H), "4d": (B, S, H, 1)). Merging two equal halves must leave the output as it is and
    add log(2) to the LSE; a layout the ring does not expect fails to broadcast or gives other values."""
    import math
    from types import SimpleNamespace

    batch, seq, heads, dim = 1, 3, 2, 5  # distinct sizes: a misplaced LSE axis cannot broadcast by chance
    gen = torch.Generator().manual_seed(0)
    query, key, value, out = (torch.randn(batch, seq, heads, dim, generator=gen) for _ in range(4))
    lse = torch.randn(batch, seq, heads, generator=gen)

    def forward_op(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, *args, **kwargs):
        return out.clone(), (lse.unsqueeze(-1) if layout == "4d" else lse.clone())

    two_ranks = SimpleNamespace(all_gather_tensor=lambda t, gather_dim, group: torch.cat([t, t], dim=gather_dim))
    probe = _with_globals(ring_forward, funcol=two_ranks, gather_size_by_comm=lambda size, group: [size, size])
    try:
        got_out, got_lse = probe(SimpleNamespace(), query, key, value, None, 0.0, False, None, False, True,
                                 forward_op, None, _fake_parallel_config(ring_degree=2))
    except (RuntimeError, ValueError, IndexError):
        return False
    got_lse = got_lse.reshape(got_lse.shape[:3]) if got_lse.numel() == lse.numel() else got_lse
    return (got_out.shape == out.shape and torch.allclose(got_out, out, atol=1e-6)
            and got_lse.shape == lse.shape and torch.allclose(got_lse, lse + math.log(2), atol=1e-6))


def _layout_from(accepted: set[str]) -> str:
    if accepted == {"3d", "4d"}:
        return "any"
    if len(accepted) == 1:
        return accepted.pop()
    # Neither layout merged right: the ring changed beyond what the probe simulates. The rule every release
    # 0.36-0.42.1 follows: 0.36 always unsqueezes; later releases expect 4-D from torch 2.9 on.
    return "3d" if versions.DIFFUSERS < (0, 37) or versions.TORCH < (2, 9) else "4d"


@lru_cache(None)
def ring_lse_layout() -> str:
    """The log-sum-exp layout diffusers' ring attention expects from a forward op.

    "3d": (B, S, H), it unsqueezes itself (0.36; 0.37 with torch < 2.9); "4d": (B, S, H, 1), used as given (0.37
    with torch >= 2.9); "any": it unsqueezes only 3-D LSEs (0.38+). Found by running the ring once on CPU.
    """
    from diffusers.models import attention_dispatch as ad

    return _layout_from({layout for layout in ("3d", "4d") if _ring_accepts(ad.TemplatedRingAttention.forward, layout)})


@lru_cache(None)
def ring_anything_lse_layout() -> str | None:
    """The same for the uneven-split ring (`ring_anything`, 0.38+; None before): 4-D on 0.38/0.39 with torch >=
    2.9, 3-D with older torch, either from 0.40."""
    from diffusers.models import attention_dispatch as ad

    ring = getattr(ad, "TemplatedRingAnythingAttention", None)
    if ring is None:
        return None
    return _layout_from({layout for layout in ("3d", "4d") if _ring_accepts(ring.forward, layout)})


def forward_op_lse_layout(ring_anything: bool) -> str:
    """The layout our forward op returns: what the ring in use expects (4-D where either is taken)."""
    layout = ring_anything_lse_layout() if ring_anything else ring_lse_layout()
    return "3d" if layout == "3d" else "4d"


# forward_op_lse_layout for (False, True), filled when the shims are installed: the forward op reads this plain
# dict, so torch.compile, tracing the op, never traces the one-time probe behind the lru_cache (it would try to
# trace a ring run on CPU tensors with a torch.Generator and fail).
_FORWARD_OP_LAYOUT: dict[bool, str] = {}


@lru_cache(None)
def context_parallel_attention_takes_masks() -> bool:
    """0.36's context-parallel attention refuses any attention mask (even one that masks nothing); 0.37+ takes one.

    Found by calling it with degrees of 1, where every release ends in the same error whatever the inputs: a call
    with a mask that ends differently from the same call without one was refused for the mask."""
    from diffusers.models import attention_dispatch as ad

    attention = inspect.unwrap(ad._templated_context_parallel_attention)
    q = k = v = torch.zeros(1, 2, 1, 4)

    def outcome(mask):
        try:
            attention(q, k, v, mask, forward_op=None, backward_op=None, _parallel_config=_fake_parallel_config())
        except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
            return type(exc), str(exc)
        return None

    return outcome(torch.ones(1, 1, 2, 2, dtype=torch.bool)) == outcome(None)


def backend_supports_cp(backend_name: str) -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(backend_name))


def set_active_backend(backend) -> None:
    """Set diffusers' process-wide default backend (0.36 has no setter; strings break the CP check: use members)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    backend = backend if isinstance(backend, AttentionBackendName) else AttentionBackendName(backend)
    if hasattr(_AttentionBackendRegistry, "set_active_backend"):
        _AttentionBackendRegistry.set_active_backend(backend)
    else:
        _AttentionBackendRegistry._active_backend = backend


def backend_unavailable_reason(backend: str) -> str | None:
    """Why the attention backend `backend` cannot run in this process (its package missing or too old: flash,
    sage, xformers...), from diffusers' own requirement check; None when it can. Local, no collective: planning
    calls it so that a rank without the package fails before the ranks agree, not alone while applying."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(backend))
    except (RuntimeError, ImportError, ValueError) as exc:
        return str(exc)
    return None


def set_model_backend(model, backend: str, processors) -> callable:
    """Set `backend` on `model`'s attention processors only (diffusers' setter also changes the process-wide
    default: put that back). Returns the undo, which restores each processor's previous backend."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active_before, _ = _AttentionBackendRegistry.get_active_backend()
    previous = [(p, getattr(p, "_attention_backend", None)) for p in processors]

    def restore():
        for p, old in previous:
            p._attention_backend = old

    try:
        model.set_attention_backend(backend)
    finally:
        set_active_backend(active_before)
    for p, _ in previous:
        p._attention_backend = AttentionBackendName(backend)
    return restore


def dispatch_attention(query, key, value, *, backend, parallel_config):
    """Attention over (B, S, H, D) tensors through diffusers' dispatcher, which applies the parallel config (the
    same call in every release 0.36-0.42.1)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(query, key, value, dropout_p=0.0, is_causal=False, backend=backend,
                                 parallel_config=parallel_config)


def is_backend_name(name: str) -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName

    try:
        AttentionBackendName(name)
    except ValueError:
        return False
    return True


def new_parallel_config(rank: int, world_size: int, device, cp_mesh, **cp_kwargs):
    """diffusers' ParallelConfig for context parallelism, set up on `cp_mesh` (what `enable_parallelism` does)."""
    from diffusers import ContextParallelConfig, ParallelConfig

    cp_config = ContextParallelConfig(**cp_kwargs)
    parallel_config = ParallelConfig(context_parallel_config=cp_config)
    parallel_config.setup(rank, world_size, device, mesh=cp_mesh)
    return parallel_config


def apply_cp_hooks(model, cp_config, plan: dict, tokens: str | None = None) -> None:
    from diffusers.hooks.context_parallel import apply_context_parallel

    apply_context_parallel(model, cp_config, plan)
    # diffusers' hooks know only the module they sit on (a block class): tagged, the split check's refusal names the
    # model, the plan key and what the sequence counts (`tokens`, from the family, else the model's class name).
    diffusers_cp_hooks.tag_plan_hooks(model, plan, tokens)


def remove_cp_hooks(model, plan: dict) -> None:
    """Remove the hooks `apply_cp_hooks` registered; hooks that were never registered are skipped."""
    diffusers_cp_hooks.remove_plan_hooks(model, plan)


def active_backend_name() -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend, _ = _AttentionBackendRegistry.get_active_backend()
    return getattr(backend, "value", str(backend))


def cp_capable_backends() -> list[str]:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return sorted(_AttentionBackendRegistry._supports_context_parallel)


# ---------------------------------------------------------------------------------------------------------
# Shim 1: a native SDPA forward op that can return the log-sum-exp. diffusers' ring asks its forward op for the
# LSE and the native op refuses ("Native attention does not support return_lse=True"), so Ring never works with
# the native backend in any release. We compute (out, lse) with the fused SDPA kernels that expose it.
# ---------------------------------------------------------------------------------------------------------


def _sdpa_with_lse(query, key, value, attn_mask, dropout_p, is_causal, scale):
    """query/key/value in (B, H, S, D). Returns out (B, H, S, D) and lse (B, H, S) in fp32."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )[:2]
        return out, lse
    if query.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
        )[:2]
        return out, lse[..., : query.shape[2]]
    # Any other device: exact math in fp32.
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float()).to(query.dtype)
    return out, lse


def _ring_mask_or_none(attn_mask, parallel_config, group=None):
    """diffusers' ring applies the local mask to every remote key chunk: only a mask that masks nothing is right.

    All ranks of `group` (default: the ring) agree with one tiny all-reduce, only when a mask is passed, and
    raise together otherwise.
    """
    if attn_mask is None:
        return None
    masks_something = (~attn_mask).any() if attn_mask.dtype == torch.bool else (attn_mask != 0).any()
    flag = masks_something.to(torch.int32).reshape(1)
    if group is None:
        group = parallel_config.context_parallel_config._ring_mesh.get_group()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item():
        from diffpar.errors import UnsupportedError

        if context_parallel_attention_takes_masks():
            raise UnsupportedError(
                "ring attention with a padding attention mask: diffusers' ring applies each rank's local mask to "
                "every other rank's keys, which would give a wrong image. Use ulysses_size instead of ring_size for "
                "this model/prompt, or prompts without padding."
            )
        raise UnsupportedError(
            f"a padding attention mask under context parallelism: the installed diffusers "
            f"{versions.version_of('diffusers')} cannot apply attention masks in context-parallel attention (0.37+ "
            "can, with Ulysses). Upgrade diffusers, or use prompts without padding."
        )
    return None


def _lse_forward_op_wrapper(wrapped, instance, args, kwargs):
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if not a["return_lse"]:
        return wrapped(*args, **kwargs)
    ctx = a["ctx"]
    query, key, value = a["query"], a["key"], a["value"]
    if a["_save_ctx"]:
        ctx.save_for_backward(query, key, value)
        ctx.attn_mask = a["attn_mask"]
        ctx.dropout_p = a["dropout_p"]
        ctx.is_causal = a["is_causal"]
        ctx.scale = a["scale"]
        ctx.enable_gqa = a["enable_gqa"]
    attn_mask = _ring_mask_or_none(a["attn_mask"], a["_parallel_config"])
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    out, lse = _sdpa_with_lse(q, k, v, attn_mask, a["dropout_p"], a["is_causal"], a["scale"])
    out = out.permute(0, 2, 1, 3)
    lse = lse.permute(0, 2, 1).contiguous()  # (B, S, H)
    cp_config = getattr(a["_parallel_config"], "context_parallel_config", None)
    ring_anything = bool(getattr(cp_config, "ring_anything", False))
    layout = _FORWARD_OP_LAYOUT[ring_anything] if ring_anything in _FORWARD_OP_LAYOUT else (
        forward_op_lse_layout(ring_anything))
    if layout == "4d":
        lse = lse.unsqueeze(-1)
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# Shim 2: uneven all-gathers on gloo. diffusers gathers per-rank chunks of different lengths with
# dist.all_gather, which NCCL allows and gloo rejects. Pad to the longest, gather, trim: same values.
# ---------------------------------------------------------------------------------------------------------


def _is_gloo(group) -> bool:
    return "gloo" in str(dist.get_backend(group)) and "nccl" not in str(dist.get_backend(group))


def gather_uneven(tensor: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather chunks whose size along `dim` differs per rank, on any backend. Exact."""
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    sizes = torch.tensor([tensor.shape[dim]], dtype=torch.int64)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    all_sizes = [int(s.item()) for s in all_sizes]
    longest = max(all_sizes)
    if tensor.shape[dim] < longest:
        pad_shape = list(tensor.shape)
        pad_shape[dim] = longest - tensor.shape[dim]
        tensor = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    chunks = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(chunks, tensor, group=group)
    return torch.cat([c.narrow(dim, 0, n) for c, n in zip(chunks, all_sizes)], dim=dim)


def _all_gather_anything_wrapper(wrapped, instance, args, kwargs):
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    tensor, dim, group = bound.arguments["tensor"], bound.arguments["dim"], bound.arguments["group"]
    if not _is_gloo(group):
        return wrapped(*args, **kwargs)
    return gather_uneven(tensor, dim, group)


# ---------------------------------------------------------------------------------------------------------
# Shim 3: any sequence length by default. Before diffusers' split hooks cut an input (or, with split_output, an
# output), every planned tensor is checked: when one does not divide over the ranks, the call switches to
# diffusers' uneven path (`ulysses_anything` 0.37+, `ring_anything` 0.38+) on the hook's ContextParallelConfig,
# which diffusers' split, gather and attention code read at each call; an even split cut by `tensor_split` is the
# same as diffusers' `chunk`, so a switch part way through a forward is exact. `uneven_split_reset_hook` puts the
# configured values back before each forward. Where no uneven path exists (0.36, Ulysses x Ring), a clear error
# names the dimension (text tokens / image tokens / frames) and where it comes from. Every rank sees the same
# shapes, so every rank decides the same, before the collective that would follow.
# ---------------------------------------------------------------------------------------------------------

_TEXT_HINTS = ("encoder_hidden_states", "encoder_attention", "txt", "text", "context_refiner", "context_embedder",
               "caption", "cap_", "prompt")
_VIDEO_HINTS = ("3D", "Video", "Wan", "LTX", "ChronoEdit", "Helios")
_AUDIO_HINTS = ("1D", "Audio", "Music")  # before the video hints: StableAudio3DiT is audio
_TOKEN_SOURCES = {
    "video": ("video tokens", "the frame count and the video size (latent frames x height x width patches: height "
              "and width over the patch size)"),
    "audio": ("audio tokens", "the audio length (the clip's duration in latent frames)"),
    "image": ("image tokens", "the image size ((height / 16) x (width / 16) for an 8x VAE with 2x2 patches)"),
}
# Outputs of a rotary-embedding module that are the text table (by module class): diffusers' QwenImage plan splits
# the image table (output 0) and the text table (output 1) of `pos_embed`.
_TEXT_OUTPUTS = {"QwenEmbedRope": (1,), "QwenEmbedLayer3DRope": (1,)}


def describe_split_dimension(model_name: str, plan_key: str, module_name: str, item,
                             tokens: str | None = None) -> tuple[str, str]:
    """(what the split dimension counts, what sets its length) for a plan entry, for error messages. `tokens`: what
    the model's sequence counts as its family says ("video", "audio", "image"); None: guessed from `model_name`."""
    where = f"{plan_key}.{item}".lower()
    if any(h in where for h in _TEXT_HINTS) or item in _TEXT_OUTPUTS.get(module_name, ()):
        return "text tokens", "the prompt's token count (prompt length, capped by max_sequence_length)"
    if model_name.startswith("ZImage") and plan_key.startswith("layers"):
        return ("image and text tokens together", "the image size and the prompt's token count (Z-Image pads each "
                "to a multiple of 32)")
    if "siglip" in where:
        return "condition-image tokens", "the size of the condition image"
    if tokens is None:
        if any(h in model_name for h in _AUDIO_HINTS):
            tokens = "audio"
        elif any(h in model_name for h in _VIDEO_HINTS):
            tokens = "video"
        else:
            tokens = "image"
    return _TOKEN_SOURCES[tokens]


def uneven_split_option(ulysses_degree: int, ring_degree: int) -> str | None:
    """The field of diffusers' uneven-split path for this layout on the installed release (taken automatically
    by a call whose lengths do not divide), or None: 0.36 has none, and no release splits Ulysses x Ring unevenly."""
    fields = cp_config_fields()
    # Ulysses' uneven path is taken automatically from 0.38 (the release that added `ring_anything`): 0.37's
    # breaks on batched inputs ("size of tensor a (23) must match b (2)", QwenImage, batch 2, 3 ranks), so there
    # only the explicit `ulysses_anything=True` takes it.
    if ulysses_degree > 1 and ring_degree == 1 and "ulysses_anything" in fields and "ring_anything" in fields:
        return "ulysses_anything"
    if ring_degree > 1 and ulysses_degree == 1 and "ring_anything" in fields:
        return "ring_anything"
    return None


def uneven_path_for(cp_config) -> str | None:
    return uneven_split_option(cp_config.ulysses_degree, cp_config.ring_degree)


def _refuse_split(hook, item, size: int, parts: int, why: str):
    from diffpar.errors import DiffparError

    model_name = getattr(hook, "diffpar_model", None) or hook.module_forward_metadata._cls.__name__
    plan_key = getattr(hook, "diffpar_plan_key", "")
    kind, source = describe_split_dimension(model_name, plan_key, hook.module_forward_metadata._cls.__name__, item,
                                            getattr(hook, "diffpar_tokens", None))
    multiple = -(-size // parts) * parts
    raise DiffparError(
        f"context parallelism on {model_name}: {size} {kind} (input {item!r} of {plan_key or 'the model'!r}) must be "
        f"split over {parts} ranks, and {why}. The length comes from {source}: choose one that gives a multiple of "
        f"{parts} {kind} (e.g. {multiple}), or change the degree."
    )


def _check_split(hook, item, tensor, entry) -> None:
    """Switch this call to the uneven path, or refuse clearly, when `tensor` cannot be cut evenly."""
    if not isinstance(tensor, torch.Tensor):
        return
    if entry.expected_dims is not None and tensor.dim() != entry.expected_dims:
        return  # diffusers leaves it whole (with a warning)
    cp_config = hook.parallel_config
    parts = cp_config._flattened_mesh.size()
    size = tensor.shape[entry.split_dim]
    if size % parts == 0:
        return
    uneven = getattr(cp_config, "ulysses_anything", False) or getattr(cp_config, "ring_anything", False)
    path = None if uneven else uneven_path_for(cp_config)
    if (uneven or path is not None) and size < parts:
        # An uneven split would leave some rank no element; attention code (RoPE, norms) does not take empty parts.
        _refuse_split(hook, item, size, parts, f"an uneven split would leave {parts - size} rank(s) without any")
    if uneven:
        return
    if path is not None:
        setattr(cp_config, path, True)
        return
    if cp_config.ulysses_degree > 1 and cp_config.ring_degree > 1:
        why = ("Ulysses and Ring together split only evenly in every diffusers release (use ulysses_size or ring_size "
               "alone, which switch to an uneven split automatically)")
    else:
        release = versions.version_of("diffusers")
        why = (f"the installed diffusers {release} splits only evenly (uneven splits: Ulysses from 0.37, Ring from "
               "0.38, used automatically; upgrade diffusers)")
    _refuse_split(hook, item, size, parts, why + f"; {size} is not divisible by {parts}")


def _split_pre_forward_wrapper(wrapped, hook, args, kwargs):
    module, *rest = args
    lookup = hook.module_forward_metadata._get_parameter_from_args_kwargs
    for name, entry in hook.metadata.items():
        if getattr(entry, "split_output", False):
            continue
        try:
            value = lookup(name, list(rest), kwargs)[0]
        except (ValueError, IndexError):
            continue  # diffusers raises its own error for this
        if isinstance(value, (list, tuple)) and isinstance(entry, (list, tuple)):
            for i, (x, e) in enumerate(zip(value, entry)):
                if not e.split_output:
                    _check_split(hook, f"{name}[{i}]", x, e)
        else:
            _check_split(hook, name, value, entry)
    return wrapped(*args, **kwargs)


def _output_fields(output):
    """A diffusers `BaseOutput` (what `return_dict=True` returns) as its field names and values, or None."""
    from diffusers.utils import BaseOutput

    if isinstance(output, BaseOutput):
        return list(output.keys()), tuple(output.values())
    return None


def _split_post_forward_wrapper(wrapped, hook, args, kwargs):
    module, output = args
    splits = {i: e for i, e in hook.metadata.items() if getattr(e, "split_output", False)}
    if not splits:
        # Nothing to split in the output: diffusers would only check that it is tensors, and refuse a block that
        # returns (tensor, None) (Kandinsky 6's fused block called without audio).
        return output
    fields = _output_fields(output)
    if fields is not None:
        names, values = fields
        return type(output)(**dict(zip(names, _split_post_forward_wrapper(wrapped, hook, (module, values), {}))))
    outputs = [output] if isinstance(output, torch.Tensor) else output
    if isinstance(outputs, (list, tuple)):
        for index, entry in splits.items():
            if isinstance(index, int) and index < len(outputs):
                _check_split(hook, index, outputs[index], entry)
    return wrapped(*args, **kwargs)


def _gather_post_forward_wrapper(wrapped, hook, args, kwargs):
    """diffusers' gather takes tensors and tuples of tensors; a `BaseOutput` is gathered field by field like the
    tuple `return_dict=False` gives, and returned as the same output class."""
    module, output = args
    fields = _output_fields(output)
    if fields is None:
        return wrapped(*args, **kwargs)
    names, values = fields
    gathered = wrapped(module, values[0] if len(values) == 1 and len(hook.metadata) == 1 else values)
    gathered = (gathered,) if isinstance(gathered, torch.Tensor) else tuple(gathered)
    return type(output)(**dict(zip(names, gathered)))


def reset_uneven_split(cp_config, configured: dict) -> None:
    """Put the uneven-split fields back to what the user configured (before each forward)."""
    for field in ("ulysses_anything", "ring_anything"):
        if hasattr(cp_config, field):
            setattr(cp_config, field, bool(configured.get(field, False)))


def _even_shard_wrapper(wrapped, instance, args, kwargs):
    """The last check, for splits made outside a plan's hooks (e.g. a ControlNet's prompt hook): a clear error
    instead of diffusers' bare `assert`."""
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    tensor, dim, mesh = bound.arguments["tensor"], bound.arguments["dim"], bound.arguments["mesh"]
    size, parts = tensor.shape[dim], mesh.size()
    if size % parts != 0:
        from diffpar.errors import DiffparError

        raise DiffparError(
            f"context parallelism: an input of shape {tuple(tensor.shape)} must be split in {parts} equal parts along "
            f"dim {dim}, but {size} is not divisible by {parts}. Set ulysses_anything=True (Ulysses) or "
            f"ring_anything=True (Ring) in ParallelismConfig to allow uneven splits, or choose an image/video size "
            f"or prompt whose token count is a multiple of {parts}."
        )
    return wrapped(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Shim 4: Ulysses with a local attention mask. Ulysses-anything: diffusers pads every rank's local mask chunk to
# the longest, concatenates, and trims only the tail, so with two or more short chunks (e.g. 4 ranks holding 6,
# 5, 5, 4 tokens) padding lands in the middle and real keys are masked out: a silently wrong image (0.37-0.42.1).
# Plain Ulysses: 0.37/0.38 do not gather a local mask at all (SDPA then fails to broadcast it against the gathered
# keys); later releases gather it. We gather the mask exactly (per-chunk trim) before diffusers sees it, on every
# release: diffusers then gets a full-length mask and uses it as is.
# ---------------------------------------------------------------------------------------------------------


def _templated_cp_wrapper(wrapped, instance, args, kwargs):
    bound = inspect.signature(wrapped).bind(*args, **kwargs)
    a = bound.arguments
    cp = a["_parallel_config"].context_parallel_config
    mask, key = a.get("attn_mask"), a["key"]
    if (mask is not None and cp.ulysses_degree > 1 and cp.ring_degree == 1 and mask.shape[-1] == key.shape[1]
            and context_parallel_attention_takes_masks()):
        a["attn_mask"] = gather_uneven(mask, mask.dim() - 1, cp._ulysses_mesh.get_group())
    elif mask is not None and (cp.ring_degree > 1 or not context_parallel_attention_takes_masks()):
        a["attn_mask"] = _ring_mask_or_none(mask, a["_parallel_config"], cp._flattened_mesh.get_group())
    return wrapped(*bound.args, **bound.kwargs)


class _SharedShims:
    """Process-wide patches of diffusers module functions, reference-counted across handles."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._patches: list[Patch] = []

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                from diffusers.hooks import context_parallel as hcp
                from diffusers.models import attention_dispatch as ad

                for ring_anything in (False, True):
                    _FORWARD_OP_LAYOUT[ring_anything] = forward_op_lse_layout(ring_anything)
                self._patches = [
                    Patch(ad, "_native_attention_forward_op", _lse_forward_op_wrapper,
                          label="diffusers attention_dispatch._native_attention_forward_op"),
                ]
                self._patches.append(
                    Patch(hcp.EquipartitionSharder, "shard", _even_shard_wrapper,
                          label="diffusers EquipartitionSharder.shard")
                )
                self._patches += [
                    Patch(hcp.ContextParallelSplitHook, "pre_forward", _split_pre_forward_wrapper,
                          label="diffusers ContextParallelSplitHook.pre_forward"),
                    Patch(hcp.ContextParallelSplitHook, "post_forward", _split_post_forward_wrapper,
                          label="diffusers ContextParallelSplitHook.post_forward"),
                    Patch(hcp.ContextParallelGatherHook, "post_forward", _gather_post_forward_wrapper,
                          label="diffusers ContextParallelGatherHook.post_forward"),
                ]
                if hasattr(ad, "_templated_context_parallel_attention"):
                    self._patches.append(
                        Patch(ad, "_templated_context_parallel_attention", _templated_cp_wrapper,
                              label="diffusers attention_dispatch._templated_context_parallel_attention")
                    )
                if hasattr(hcp, "_all_gather_anything"):
                    self._patches.append(
                        Patch(hcp, "_all_gather_anything", _all_gather_anything_wrapper,
                              label="diffusers hooks.context_parallel._all_gather_anything")
                    )
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for p in reversed(self._patches):
                    p.undo()
                self._patches = []

    @property
    def active(self) -> bool:
        return self._users > 0

    @staticmethod
    def planned_names() -> list[str]:
        """What `acquire` would patch on the installed release (for the dry run), without patching anything."""
        from diffusers.hooks import context_parallel as hcp
        from diffusers.models import attention_dispatch as ad

        names = ["native attention returns its log-sum-exp (ring)", "even-split check with a clear error",
                 "any sequence length: uneven split per call where the release has one",
                 "return_dict=True outputs split and gathered like tuples"]
        if hasattr(ad, "_templated_context_parallel_attention"):
            names.append("masks under ring / Ulysses-anything mask gather")
        if hasattr(hcp, "_all_gather_anything"):
            names.append("uneven all-gather: pad, gather, trim (gloo)")
        return names

    def reset(self) -> None:
        """Remove the shims whatever holds them (for test harnesses between tests, whose models are gone)."""
        with self._lock:
            for p in reversed(self._patches):
                p.undo()
            self._patches = []
            self._users = 0


SHARED_SHIMS = _SharedShims()


# ---------------------------------------------------------------------------------------------------------
# Guard: a text mask the plan leaves whole while it splits the text. QwenImage on 0.37.x/0.38 splits
# `encoder_hidden_states` per rank but builds the joint [text, image] mask from the whole prompt mask in the
# model's forward: after Ulysses' all-to-all the keys are in rank order ([text_0, image_0, text_1, ...]) and the
# mask is not, so a padded prompt gives a silently wrong image (0.0199 on a tiny model). 0.36 and 0.39+ split the
# mask with the text. Where the plan does not, a prompt mask that masks something is refused on every rank
# (every rank gets the same prompt); an all-true mask changes nothing and runs.
# ---------------------------------------------------------------------------------------------------------


def leaves_text_mask_whole(model, plan: dict) -> bool:
    """Whether `model` takes an `encoder_hidden_states_mask` that `plan` splits nowhere while splitting the text."""
    if "encoder_hidden_states_mask" not in inspect.signature(model.forward).parameters:
        return False
    inputs = [key for entry in plan.values() if isinstance(entry, dict) for key in entry]
    return "encoder_hidden_states" in inputs and "encoder_hidden_states_mask" not in inputs


def guard_whole_text_mask(model, plan: dict, handle, name: str) -> None:
    """Refuse padded prompts on `model` where `leaves_text_mask_whole`; records its undo on `handle`. Skipped where
    the family's attention processors handle the whole text mask themselves: they cut it to each rank's keys, or
    lay it out in the order Ulysses gathers keys, and say so with a class attribute `cuts_whole_text_mask = True`
    (installed by the plan's prepare step before this runs)."""
    if not leaves_text_mask_whole(model, plan):
        return
    processors = getattr(model, "attn_processors", None)
    if isinstance(processors, dict) and any(getattr(p, "cuts_whole_text_mask", False) for p in processors.values()):
        return
    hooks = []
    handle.add(f"{name}: padded-prompt guard", lambda: [h.remove() for h in hooks])

    # diffusers 0.39 began splitting the mask with the prompt in its own plans; advise the upgrade only below it.
    upgrade = "" if versions._parse(diffusers.__version__) >= (0, 39) else "Upgrade to diffusers>=0.39, or: "

    def refuse_padded_prompt(module, args, kwargs):
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise UnsupportedError(
                f"{type(module).__name__} with a padded prompt under context parallelism: diffusers "
                f"{versions.version_of('diffusers')} splits the prompt over the ranks but keeps its attention mask "
                f"whole, which would give a wrong image. {upgrade}Pass prompts without padding "
                "(encoder_hidden_states_mask=None or all true)."
            )

    hooks.append(model.register_forward_pre_hook(refuse_padded_prompt, with_kwargs=True))
