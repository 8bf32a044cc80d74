"""Evidence that a parallel run split its work: tokens entering attention and collectives issued, per rank.

An output equal to one process's proves nothing about parallelism: a parallel setup that silently did nothing
gives a difference of exactly 0. `SplitProbe` is put around a model or pipeline call on each rank:

    with SplitProbe(pipe.transformer) as probe:
        image = pipe(...)
    probe.summary()  # {"tokens": [...], "collectives": {...}, ...}

It records (1) the sequence length entering the first attention module at each call (a forward pre-hook on the
first module with a `processor` attribute, skipping those the plan leaves whole: `UNSPLIT_ATTENTION`), as
`hidden_states` and `encoder_hidden_states` where the attention takes both, and its `heads`; and (2) every
torch.distributed collective issued during the call (c10d and the functional collectives diffusers' context
parallelism uses), counted overall and per attention call (how many attention calls issued it), with the sizes of
the groups it ran on. Everything it wraps or registers is restored on exit.

`split_problems` / `assert_split` turn the summaries of one parallel run (every rank) and of the same call in one
process into what shows the work was not split. diffusers' collectives, measured on 0.36.0 and 0.42.1: Ulysses
(and `ulysses_anything`) all-to-alls q, k, v and the output with `funcol.all_to_all_single`; Ring (and
`ring_anything`) gathers every rank's KV once per attention call with `funcol.all_gather_tensor`; the output is
gathered with `funcol.all_gather_tensor`, or with c10d `all_gather` under *_anything (diffpar's gloo shim).
"""
from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import threading
from collections import Counter

import torch
import torch.distributed as dist

from diffpar.compat.collectives import EXCHANGE_METHOD

# c10d entry points: looked up as `dist.<name>` by diffpar and diffusers, and as module globals inside
# torch.distributed.distributed_c10d itself (e.g. all_gather_object -> all_gather). Both bindings are wrapped.
C10D_NAMES = (
    "all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce",
    "broadcast", "broadcast_object_list", "reduce_scatter_tensor", "send", "recv", "batch_isend_irecv", "barrier",
)
# Not wrapped: `isend` / `irecv`. `dist.P2POp` accepts only those very functions (an identity check), so a wrapper
# would break the VAE's halo exchange; its point-to-point traffic is counted through `batch_isend_irecv`.
# Functional collectives: diffusers' Ulysses all-to-alls (`funcol.all_to_all_single`), its ring's KV gather and
# its output gather (`funcol.all_gather_tensor`), and the ring backward (`funcol.permute_tensor`), on 0.36-0.42.
FUNCOL_NAMES = (
    "all_to_all_single", "all_to_all_single_autograd", "all_gather_tensor", "all_gather_tensor_autograd",
    "all_reduce", "reduce_scatter_tensor", "permute_tensor", "broadcast",
)

# What each kind of context parallelism issues inside every attention call, on every diffusers release 0.36+.
ULYSSES_COLLECTIVE = "funcol.all_to_all_single"
RING_COLLECTIVE = "funcol.all_gather_tensor"


def _group_size(group) -> int | None:
    """Ranks in a collective's group argument: None (the world), a ProcessGroup, a DeviceMesh, a rank list."""
    try:
        if group is None:
            return dist.get_world_size()
        if isinstance(group, dist.ProcessGroup):
            return dist.get_world_size(group)
        if isinstance(group, (list, tuple)) and group and all(isinstance(r, int) for r in group):
            return len(group)
        if isinstance(group, tuple) and len(group) == 2:  # (mesh, mesh dim)
            return group[0].size(group[1])
        if hasattr(group, "size") and hasattr(group, "get_group"):  # DeviceMesh
            return group.size()
    except Exception:  # noqa: BLE001 - a size we cannot read is recorded as unknown, never breaks the call
        return None
    return None


# Attention modules a plan legitimately leaves whole (they run before the split, or attend from a shard to keys
# every rank holds in full, which needs no communication), by model class: fnmatch patterns of module names.
UNSPLIT_ATTENTION = {
    # The token refiner runs on the whole prompt before the split (diffpar's plan pools over the prompt).
    "HunyuanVideoTransformer3DModel": ("context_embedder.*",),
    "HunyuanImageTransformer2DModel": ("context_embedder.*",),  # the same token refiner
    # Krea 2's text fusion runs on the whole prompt on every rank, before the split.
    "Krea2Transformer2DModel": ("text_fusion.*",),
    "HunyuanVideo15Transformer3DModel": ("context_embedder.*",),
    "HunyuanVideoFramepackTransformer3DModel": ("context_embedder.*",),
    # The prompt's own blocks run whole on every rank; the cross-attention reads the whole prompt locally.
    "Kandinsky5Transformer3DModel": ("text_transformer_blocks.*", "visual_transformer_blocks.*.cross_attention"),
    "CosmosTransformer3DModel": ("transformer_blocks.*.attn2",),
    "AllegroTransformer3DModel": ("transformer_blocks.*.attn2",),
    # Temporal attention runs over frames, which the plan does not split (each rank holds all frames of its patches).
    "LatteTransformer3DModel": ("temporal_transformer_blocks.*",),
    # Cross-attention to the prompt: diffusers 0.37+ keeps the prompt whole (0.36 split it), so the image shard
    # attends to every key locally.
    "WanTransformer3DModel": ("blocks.*.attn2",),
    # diffusers' ChronoEdit plan keeps the prompt (and image context) whole, like Wan's.
    "ChronoEditTransformer3DModel": ("blocks.*.attn2",),
    "HeliosTransformer3DModel": ("blocks.*.attn2",),
    # The text token refiner runs on the whole prompt before the split (diffpar keeps its attention local).
    "MiniMaxH3Transformer3DModel": ("token_refiner.*",),
    # Wan derivatives (diffpar's plans): cross-attention to the whole prompt, locally.
    "WanVACETransformer3DModel": ("blocks.*.attn2", "vace_blocks.*.attn2"),
    "SkyReelsV2Transformer3DModel": ("blocks.*.attn2",),
    # AnyFlow (Wan 2.1 blocks, diffpar's plan): cross-attention to the whole prompt, locally.
    "AnyFlowTransformer3DModel": ("blocks.*.attn2",),
    # Wan Animate's face adapters attend from each frame's tokens to that frame's motion vectors, locally.
    "WanAnimateTransformer3DModel": ("blocks.*.attn2", "face_adapter.*"),
    # diffpar's LTX plan keeps the prompt whole: the cross-attention runs locally.
    "LTXVideoTransformer3DModel": ("transformer_blocks.*.attn2",),
    # LTX-2: only the video self-attention is split; the prompt and audio attentions run locally, and the
    # video-to-audio one gathers the video keys first.
    "LTX2VideoTransformer3DModel": ("transformer_blocks.*.attn2", "transformer_blocks.*.audio_*",
                                    "transformer_blocks.*.video_to_audio_attn"),
    # Kandinsky 6: only the video self-attention is split; the text branches, prompt and audio attentions run
    # locally, and the audio-to-video one gathers the video keys first.
    "Kandinsky6Transformer3DModel": ("*_text_transformer_blocks.*", "visual_transformer_blocks.*.audio_dec_block.*",
                                     "visual_transformer_blocks.*.video_dec_block.cross_attention",
                                     "visual_transformer_blocks.*.va_cross_attention",
                                     "visual_transformer_blocks.*.av_cross_attention"),
    # Motif-Video: the text cross-attention gathers the whole prompt, then attends locally.
    "MotifVideoTransformer3DModel": ("*.cross_attn",),
    # The context refiner runs on the whole prompt, with its padding mask, on every rank (diffpar's plan).
    "Lumina2Transformer2DModel": ("context_refiner.*",),
    # The Perceiver squeezes the whole prompt into gist tokens before the split; the injection layers' cross-attention
    # attends from the image shard to the whole prompt.
    "BriaFibo2Transformer2DModel": ("perceiver.*", "layers.*.cross_attention"),
    # Audio DiTs (diffpar's plans): cross-attention from the frame shard to the whole prompt, locally.
    "StableAudio3DiTModel": ("transformer_blocks.*.cross_attn",),
    "LongCatAudioDiTTransformer": ("blocks.*.cross_attn",),
    # ACE-Step's sliding-window layers (the even ones, by default) all-gather every rank's keys (c10d) and attend
    # locally under their band rows; not counted: the full-attention layers carry the Ulysses / Ring evidence.
    "AceStepTransformer1DModel": ("layers.*[02468].self_attn",),
}


# Attention a plan splits exactly by all-reducing per-shard sums over the context-parallel ranks instead of
# Ulysses' all-to-all or the ring: linear attention, whose key-value summary is a sum over all tokens (diffpar's
# Sana plan). By model class: fnmatch patterns of module names. Where every watched attention is one of these, the
# collective each call must issue is `REDUCE_COLLECTIVE`, over a group of the context-parallel degree.
REDUCED_ATTENTION = {
    "SanaTransformer2DModel": ("transformer_blocks.*.attn1",),
}
REDUCE_COLLECTIVE = "c10d.all_reduce"


def _attention_modules(model: torch.nn.Module, unsplit) -> list[tuple[str, torch.nn.Module]]:
    # diffusers' generic `Attention` marks cross-attention (keys from a prompt every rank holds whole, attended
    # locally from the query shard): left whole like the `unsplit` patterns.
    candidates = [(name, m) for name, m in model.named_modules()
                  if hasattr(m, "processor") and not any(fnmatch.fnmatchcase(name, p) for p in unsplit)]
    self_attention = [(name, m) for name, m in candidates if getattr(m, "is_cross_attention", False) is not True]
    # Some models build their self-attention with `cross_attention_dim` set (OmniGen), which marks every one of
    # them cross-attention: then the flag says nothing, and all of them are watched.
    return self_attention or candidates


def _split_at_own_input(attention: torch.nn.Module) -> bool:
    """Whether a context-parallel split hook sits on this attention module itself (and it has a query projection
    whose input then shows the split)."""
    from diffpar.compat.diffusers_cp_hooks import has_split_hook

    return isinstance(getattr(attention, "to_q", None), torch.nn.Module) and has_split_hook(attention)


def _sequence_length(x) -> int:
    if isinstance(x, torch.Tensor) and x.dim() >= 2:
        return int(x.shape[1])
    return 0


@contextlib.contextmanager
def collective_shapes_recorded(name: str):
    """While entered, every call of `torch.distributed.<name>` (e.g. "broadcast", "all_reduce") is recorded: yields
    the list of the shapes of the tensors it was given, in order."""
    shapes, original = [], getattr(dist, name)

    def recorded(tensor, *args, **kwargs):
        shapes.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    setattr(dist, name, recorded)
    try:
        yield shapes
    finally:
        setattr(dist, name, original)


@contextlib.contextmanager
def group_exchanges_counted(on_call):
    """While entered, `on_call()` runs at every collective issued on a process group's own method of the kind the
    call agreement issues its exchange with (`diffpar.compat.collectives`), below the torch.distributed functions
    the counters here wrap. A dist-level collective of that kind calls the method too; callers that also count
    those must skip it."""
    method = EXCHANGE_METHOD
    if method is None:
        yield
        return
    entry = vars(dist.ProcessGroup)[method]  # pybind11's own entry: put back as it was, it binds the group again
    unbound = getattr(dist.ProcessGroup, method)

    def counted(group, *args, **kwargs):
        on_call()
        return unbound(group, *args, **kwargs)

    setattr(dist.ProcessGroup, method, counted)
    try:
        yield
    finally:
        setattr(dist.ProcessGroup, method, entry)


class SplitProbe:
    """Context manager recording, on this rank, what the first attention saw and which collectives ran.

    `model`: the module whose attention to watch (a pipeline object is accepted and its `transformer` used).
    `unsplit`: fnmatch patterns of attention module names the parallel plan leaves whole; they are neither the
    watched first attention nor counted (default: `UNSPLIT_ATTENTION` for the model's class).
    """

    def __init__(self, model, unsplit: tuple[str, ...] | None = None):
        if not isinstance(model, torch.nn.Module) and hasattr(model, "transformer"):
            model = model.transformer
        if unsplit is None:
            unsplit = UNSPLIT_ATTENTION.get(type(model).__name__, ())
        self._attention = _attention_modules(model, unsplit)
        if not self._attention:
            raise ValueError(f"{type(model).__name__} has no attention module (one with a `processor`) to watch")
        self.attention_name = self._attention[0][0]
        reduced = REDUCED_ATTENTION.get(type(model).__name__, ())
        self.reduced_attention = bool(reduced) and all(
            any(fnmatch.fnmatchcase(name, p) for p in reduced) for name, _ in self._attention)
        self.image_tokens: list[int] = []  # hidden_states entering the first attention, per call
        self.text_tokens: list[int] = []  # encoder_hidden_states entering it (0 where it takes none)
        self.heads: list = []  # the first attention's `heads` at each call (tensor parallelism gives each rank some)
        self.attention_calls = 0  # calls of the watched attention modules
        self.attention_calls_with: Counter = Counter()  # collective -> attention calls that issued it (once each)
        self.collectives: Counter = Counter()  # collective -> calls, anywhere during the probe
        self.group_sizes: dict[str, set] = {}  # collective -> sizes of the groups it ran on
        self._local = threading.local()
        self._hooks: list = []
        self._wrapped: list[tuple[object, str, object, object]] = []  # (owner, attribute, original, wrapper)
        self._signature = None

    # -- attention hooks -------------------------------------------------------------------------------------

    def _first_pre_hook(self, module, args, kwargs):
        if self._signature is None:
            self._signature = inspect.signature(module.forward)
        try:
            bound = self._signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = dict(kwargs)
        if "gen_seq" in bound:  # Cosmos 3's packed pathways (no batch dimension): the generation tokens are split,
            # the causal prompt prefix (`und_seq`) is whole on every rank by design
            self.image_tokens.append(int(bound["gen_seq"].shape[0]))
            self.text_tokens.append(0)
        else:
            hidden = bound.get("hidden_states", args[0] if args else None)
            self.image_tokens.append(_sequence_length(hidden))
            self.text_tokens.append(_sequence_length(bound.get("encoder_hidden_states")))
        heads = getattr(module, "heads", None)
        self.heads.append(heads if isinstance(heads, int) else None)

    def _query_pre_hook(self, attention):
        def record(module, args):
            self.image_tokens.append(_sequence_length(args[0] if args else None))
            self.text_tokens.append(0)  # a self-attention: no encoder states
            heads = getattr(attention, "heads", None)
            self.heads.append(heads if isinstance(heads, int) else None)

        return record

    def _enter_attention(self, module, args):
        self.attention_calls += 1
        stack = getattr(self._local, "issued", None)
        if stack is None:
            stack = self._local.issued = []
        stack.append(set())  # collectives issued inside this call

    def _leave_attention(self, module, args, output):
        stack = getattr(self._local, "issued", None)
        if stack:
            for label in stack.pop():
                self.attention_calls_with[label] += 1

    # -- collectives -----------------------------------------------------------------------------------------

    def _wrap(self, owner, attribute: str, label: str) -> None:
        original = getattr(owner, attribute, None)
        if original is None or not callable(original):
            return
        try:
            signature = inspect.signature(original)
        except (TypeError, ValueError):
            signature = None
        probe = self

        @functools.wraps(original)
        def counted(*args, **kwargs):
            depth = getattr(probe._local, "depth", 0)
            if depth == 0:  # only the outermost call: all_gather_object's own all_gather is not a second one
                probe._record(label, signature, args, kwargs)
            probe._local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                probe._local.depth = depth

        self._wrapped.append((owner, attribute, original, counted))
        setattr(owner, attribute, counted)

    def _record(self, label, signature, args, kwargs) -> None:
        self.collectives[label] += 1
        for issued in getattr(self._local, "issued", None) or ():
            issued.add(label)
        group = kwargs.get("group")
        if signature is not None and "group" not in kwargs:
            try:
                group = signature.bind_partial(*args, **kwargs).arguments.get("group")
            except TypeError:
                group = None
        self.group_sizes.setdefault(label, set()).add(_group_size(group))

    # -- context manager -------------------------------------------------------------------------------------

    def __enter__(self) -> "SplitProbe":
        try:
            first = self._attention[0][1]
            if _split_at_own_input(first):
                # diffusers' plan splits this attention's own input (Helios): a pre-hook on the module runs before
                # that split, so its tokens are read where its query projection sees them.
                self._hooks.append(first.to_q.register_forward_pre_hook(self._query_pre_hook(first)))
            else:
                self._hooks.append(first.register_forward_pre_hook(self._first_pre_hook, with_kwargs=True))
            for _, module in self._attention:
                self._hooks.append(module.register_forward_pre_hook(self._enter_attention))
                self._hooks.append(module.register_forward_hook(self._leave_attention))
            from torch.distributed import distributed_c10d

            for name in C10D_NAMES:
                for owner in (dist, distributed_c10d):
                    self._wrap(owner, name, f"c10d.{name}")
            if dist.is_available():
                import torch.distributed._functional_collectives as funcol

                for name in FUNCOL_NAMES:
                    self._wrap(funcol, name, f"funcol.{name}")
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._local.issued = []  # an attention call that raised never reached its forward hook
        self._restore()

    def _restore(self) -> None:
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks = []
        stale = []
        for owner, attribute, original, wrapper in reversed(self._wrapped):
            if getattr(owner, attribute) is wrapper:
                setattr(owner, attribute, original)
            else:
                stale.append(f"{getattr(owner, '__name__', owner)}.{attribute}")
        self._wrapped = []
        if stale:
            raise RuntimeError(f"SplitProbe: rewrapped while probing, not restored: {', '.join(stale)}")

    # -- results ---------------------------------------------------------------------------------------------

    @property
    def tokens(self) -> list[int]:
        """Tokens entering the first attention per call: hidden_states plus encoder_hidden_states."""
        return [i + t for i, t in zip(self.image_tokens, self.text_tokens)]

    def summary(self) -> dict:
        """Plain data (picklable) for a test to check on the parent side."""
        return {
            "attention": self.attention_name,
            "reduced_attention": self.reduced_attention,
            "tokens": self.tokens,
            "image_tokens": list(self.image_tokens),
            "text_tokens": list(self.text_tokens),
            "heads": list(self.heads),
            "attention_calls": self.attention_calls,
            "attention_calls_with": dict(self.attention_calls_with),
            "collectives": dict(self.collectives),
            "group_sizes": {k: sorted(v, key=lambda s: -1 if s is None else s) for k, v in self.group_sizes.items()},
        }


# -- checks (parent side) ---------------------------------------------------------------------------------------


def expected_shards(length: int, parts: int) -> list[int]:
    """Tokens per rank when `length` tokens are split over `parts` ranks (diffusers' even split, or
    torch.tensor_split's sizes under *_anything: the first `length % parts` ranks hold one more)."""
    return [length // parts + (1 if i < length % parts else 0) for i in range(parts)]


def expected_collectives(config: dict) -> list[str]:
    """The collective every split attention call issues for a ParallelismConfig's keyword arguments."""
    kinds = []
    if config.get("ulysses_size", 1) > 1:
        kinds.append(ULYSSES_COLLECTIVE)
    if config.get("ring_size", 1) > 1:
        kinds.append(RING_COLLECTIVE)
    return kinds


def context_parallel_degree(config: dict) -> int:
    return config.get("ulysses_size", 1) * config.get("ring_size", 1)


def split_problems(reference: dict, summaries: list[dict], config: dict, text_cut: bool = False,
                   whole_calls=()) -> list[str]:
    """What shows that the work was NOT split as `config` asks; empty when it was.

    `reference`: a SplitProbe summary of the same call in one process. `summaries`: one per rank of the world, in
    rank order. Checks, for every forward: the image (`hidden_states`) and text (`encoder_hidden_states`) tokens
    entering the first attention are the one-process lengths split over the context-parallel degree (every CP
    group holds each shard once), and fewer in all than one process saw; and that every watched attention call
    issued the collective its kind of parallelism needs (all-to-all for Ulysses, the ring's KV gather for Ring),
    as many attention calls as in one process. `text_cut`: the plan may drop padded text tokens first
    (HunyuanVideo), so each group's text total may be below one process's, still split evenly. `whole_calls`:
    indices of first-attention calls the plan runs whole by design (Z-Image ControlNet 2.0 refines its condition
    over the whole image first); those must see exactly one process's tokens.
    """
    parts = context_parallel_degree(config)
    kinds = expected_collectives(config)
    reduced = bool(summaries) and all(s.get("reduced_attention") for s in summaries)
    if reduced and kinds:
        kinds = [REDUCE_COLLECTIVE]
    if parts < 2 and config.get("tp_size", 1) > 1:
        return _tensor_parallel_problems(reference, summaries)
    problems = []
    if parts < 2 or not kinds:
        return [f"config {config} has no context or tensor parallelism to check"]
    world = len(summaries)
    groups = world // parts
    forwards = len(reference["tokens"])
    if forwards == 0:
        problems.append("the one-process run never reached the watched attention")
    for rank, s in enumerate(summaries):
        if len(s["tokens"]) != forwards:
            problems.append(f"rank {rank}: {len(s['tokens'])} forwards reached {s['attention']}, one process "
                            f"{forwards}")
    if problems:
        return problems
    whole_calls = set(whole_calls)
    for i in range(forwards):
        if i in whole_calls:
            seen = [s["tokens"][i] for s in summaries]
            if seen != [reference["tokens"][i]] * world:
                problems.append(f"forward {i}: tokens per rank {seen}, expected one process's "
                                f"{reference['tokens'][i]} (whole by design)")
            continue
        for stream in ("image_tokens", "text_tokens"):
            full = reference[stream][i]
            seen = sorted(s[stream][i] for s in summaries)
            total = sum(seen) // groups if groups else 0
            if stream == "text_tokens" and text_cut and 0 < total <= full:
                full = total
            want = sorted(expected_shards(full, parts) * groups)
            if seen != want:
                problems.append(f"forward {i}: {stream} per rank {seen}, expected {want} ({full} split over "
                                f"{parts})")
        for rank, s in enumerate(summaries):
            if s["tokens"][i] >= reference["tokens"][i]:
                problems.append(f"forward {i}: rank {rank} saw {s['tokens'][i]} tokens, not fewer than one "
                                f"process's {reference['tokens'][i]}")
    for rank, s in enumerate(summaries):
        if s["attention_calls"] != reference["attention_calls"] or not s["attention_calls"]:
            problems.append(f"rank {rank}: {s['attention_calls']} attention calls, one process "
                            f"{reference['attention_calls']}")
        for kind in kinds:
            issued = s["attention_calls_with"].get(kind, 0)
            if issued < s["attention_calls"] or not issued:
                problems.append(f"rank {rank}: {kind} issued in {issued} of {s['attention_calls']} attention calls")
        sizes = (((REDUCE_COLLECTIVE, parts),) if reduced else
                 ((ULYSSES_COLLECTIVE, config.get("ulysses_size", 1)), (RING_COLLECTIVE, config.get("ring_size", 1))))
        for kind, size in sizes:
            if size > 1 and size not in s["group_sizes"].get(kind, ()):
                problems.append(f"rank {rank}: no {kind} over a group of {size} ranks "
                                f"(groups: {s['group_sizes'].get(kind, [])})")
    return problems


ALL_REDUCES = ("c10d.all_reduce", "funcol.all_reduce")


def _tensor_parallel_problems(reference: dict, summaries: list[dict]) -> list[str]:
    """Tensor parallelism keeps the whole sequence and splits heads and MLP widths: each split layer ends in a
    row-parallel linear whose partial sums are all-reduced (diffusers' DTensor plans: funcol; diffpar's: c10d).
    So: every rank sees one process's tokens, some attention call of every forward issues an all-reduce, and
    there are at least as many all-reduces as attention calls (one per split layer per forward)."""
    problems = []
    forwards = len(reference["tokens"])
    for rank, s in enumerate(summaries):
        if s["tokens"] != reference["tokens"]:
            problems.append(f"rank {rank}: tokens {s['tokens']}, tensor parallelism keeps one process's "
                            f"{reference['tokens']}")
        in_attention = sum(s["attention_calls_with"].get(k, 0) for k in ALL_REDUCES)
        if in_attention < max(forwards, 1):
            problems.append(f"rank {rank}: an all-reduce in {in_attention} attention calls over {forwards} forwards")
        total = sum(s["collectives"].get(k, 0) for k in ALL_REDUCES)
        if total < max(reference["attention_calls"], 1):
            problems.append(f"rank {rank}: {total} all-reduces for {reference['attention_calls']} attention calls")
    return problems


def assert_split(results: list[dict], config: dict, key: str = "split", **options) -> None:
    """Assert on worker results (one dict per rank holding SplitProbe summaries under `key` and
    `key + "_reference"`) that `config`'s context parallelism split the work on every rank (`options`: those of
    `split_problems`)."""
    ordered = sorted(results, key=lambda r: r.get("rank", 0))
    problems = split_problems(ordered[0][f"{key}_reference"], [r[key] for r in ordered], config, **options)
    assert not problems, "the work was not split:\n  " + "\n  ".join(problems)
