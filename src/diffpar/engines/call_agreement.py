"""Every call agreed: before a parallel pipeline (or bare model) call runs, the ranks compare what must match.

Ranks that call a parallel pipeline differently (another size, step count, prompt, guidance scale, number of
images) either hang in a collective, abort inside gloo, or silently blend their inputs into one image. So each
call starts with one small exchange (`mesh.agree_start`: one sum all-reduce of a table holding each rank's row: a
fingerprint of a plain description of its arguments, and its random states themselves, or their digest when more
than one generator's; the descriptions are exchanged only when fingerprints differ); a mismatch is a
`RankMismatchError` on every rank naming the argument and each rank's value.

What is compared, per argument (`describe_value`):
- tensors: shape, dtype and their values: on the CPU a hash of their bytes (`cpu_tensor_digest`), elsewhere a
  checksum of every element (float64 sum, sum of squares, position-weighted sum, read in one transfer per call);
  arguments whose values diffpar makes equal itself (`latents`: the initial noise is broadcast from rank 0) by
  shape and dtype only;
- strings: the text (a long one: its first 60 characters and a hash of all of it); lists and tuples element by
  element; dicts by key;
- numbers, booleans, None: the value; PIL images and numpy arrays: size and a hash of their bytes;
- generators: by device only (each rank may seed its own: every generator of the call, and torch's global random
  state, get rank 0's state when they differ, so every draw in the call agrees);
- anything else callable: that it is there.
`verify_weights=True` adds a checksum of every watched module's weights to each call's description, for users who
change weights after enabling (a LoRA loaded or scaled on one rank only).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import numbers
import threading
import time
import traceback

import torch
import torch.distributed as dist

from diffpar import mesh as mesh_lib
from diffpar.compat.collectives import issue_all_reduce_sum
from diffpar.compat.torch_compile import any_compiled
from diffpar.errors import DiffparError
from diffpar.patch import Patch

class _RestartCall(BaseException):
    """Raised at a call's settle point when the call drew random numbers before it while the ranks' random states
    differed (each rank seeded its own generator): those draws came from each rank's own state. Every rank finds the
    same (the same code on agreed arguments) and the call wrapper runs the call again from rank 0's states. A
    BaseException, so that a pipeline's own `except Exception` cannot swallow it."""


# Arguments whose values diffpar itself makes equal on every rank: compared by shape only.
BROADCAST_ARGS = frozenset({"latents"})
_TEXT_SHOWN = 60


def tensor_checksum(t: torch.Tensor) -> list:
    """[float64 sum, float64 sum of squares]: equal on every rank for equal tensors, different for different ones
    in practice; cheap (two reductions)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    d = t.to(torch.float64)
    return [float(d.sum()), float((d * d).sum())]


def argument_checksum(t: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares, position-weighted sum] of every element, in float64, as one tensor on `t`'s device
    (read with the other arguments' in one transfer). The weighted sum (weights n, n-1, ..., 1, from a cumulative
    sum) tells apart tensors that hold the same values in another order: a batch of prompt embeddings given in
    another order on one rank."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    d = t.reshape(-1).to(torch.float64)
    return torch.stack([d.sum(), d.dot(d), d.cumsum(0).sum()])


def cpu_tensor_bytes(t: torch.Tensor):
    """The bytes of a plain CPU tensor's values, in order (its memory itself when contiguous; conjugated and negated
    views resolved, other layouts made contiguous), as a uint8 array; None for anything else (another device, a tensor
    subclass, a sparse layout)."""
    if type(t) is not torch.Tensor or t.device.type != "cpu" or t.layout is not torch.strided:
        return None
    t = t.detach()
    if t.is_complex() or t.is_neg():  # lazily conjugated or negated views: their values, not their memory
        t = t.resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy()  # keeps the (possibly new) contiguous tensor alive


def cpu_tensor_digest(t: torch.Tensor) -> str | None:
    """A hash of a plain CPU tensor's bytes (blake2b over `cpu_tensor_bytes`): equal tensors have equal bytes, and
    any other order or value changes it. One hash where the element checksum takes seven torch operations a tensor
    (117 us of a call's 194 us describing two prompt-embedding tensors, cold, on 2 gloo ranks). None for anything
    else (another device, a tensor subclass, a sparse layout): `argument_checksum` then."""
    data = cpu_tensor_bytes(t)
    return None if data is None else "bytes " + hashlib.blake2b(data, digest_size=8).hexdigest()


def weights_checksum(module: torch.nn.Module) -> list:
    """Checksum of every parameter and buffer of `module`, in registration order."""
    total, squares = 0.0, 0.0
    for t in list(module.parameters()) + list(module.buffers()):
        for part in _plain_parts(t):
            if part.is_meta:
                continue
            s, q = tensor_checksum(part)
            total += s
            squares += q
    return [total, squares]


def _plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s values: `t` itself, or for a tensor subclass that implements no reductions
    (torchao's quantized weights: int8 data and scales) its inner tensors, recursively."""
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(data) is torch.Tensor or not hasattr(data, "__tensor_flatten__"):
        return [data]
    names, _ = data.__tensor_flatten__()
    return [part for name in names for part in _plain_parts(getattr(data, name))]


def _text(value: str):
    """A string as its description holds it: whole when short; else its start and a hash of all of it (blake2b, as
    the call's fingerprint: one hashing routine to bring into the cold caches of a call's start)."""
    if len(value) <= _TEXT_SHOWN:
        return repr(value)
    digest = hashlib.blake2b(value.encode(), digest_size=6).hexdigest()
    return f"{value[:_TEXT_SHOWN] + '...'!r} (hash {digest})"


def describe_value(value, name: str = "", checksums: list | None = None):
    """A plain, JSON-able, rank-comparable description of one call argument.

    A tensor's checksum is computed where the tensor lives; with `checksums` given, the description holds a
    placeholder and (description, checksum tensor) is appended to it, for `fill_checksums` to read them all at
    once (one device-to-host transfer per call, not two per tensor)."""
    kind = type(value)  # the common plain kinds first, by exact type (this runs on every call)
    if kind is str:
        return _text(value)
    if kind is int or kind is float or kind is bool or value is None:
        return value
    if isinstance(value, torch.Tensor):
        if name in BROADCAST_ARGS:
            return {"shape": list(value.shape), "dtype": str(value.dtype)}
        out = {"shape": list(value.shape), "dtype": str(value.dtype), "checksum": None}
        if value.numel() == 0:
            out["checksum"] = [0.0, 0.0, 0.0]
        elif (digest := cpu_tensor_digest(value)) is not None:
            out["checksum"] = digest
        elif checksums is None:
            out["checksum"] = argument_checksum(value).tolist()
        else:
            checksums.append((out, argument_checksum(value)))
        return out
    if isinstance(value, str):
        return _text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, numbers.Number):
        return float(value) if isinstance(value, float) else int(value) if isinstance(value, int) else repr(value)
    if isinstance(value, torch.Generator):  # its state is made rank 0's at the call's start; only the device matters
        return f"<generator on {value.device.type}>"
    if isinstance(value, (list, tuple)):
        return [describe_value(v, name, checksums) for v in value]
    if isinstance(value, dict):
        return {str(k): describe_value(v, str(k), checksums) for k, v in sorted(value.items(), key=_str_key)}
    tobytes = getattr(value, "tobytes", None)
    if callable(tobytes):  # PIL images, numpy arrays
        size = getattr(value, "size", None)
        shape = getattr(value, "shape", None)
        return {"type": type(value).__name__, "size": repr(shape if shape is not None else size),
                "hash": hashlib.blake2b(tobytes(), digest_size=6).hexdigest()}
    if callable(value):
        return "<callable>"
    return f"<{type(value).__name__}>"


@functools.lru_cache(maxsize=256)
def _signature(fn) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


@functools.lru_cache(maxsize=256)
def _parameters(fn) -> tuple[tuple[str, ...], frozenset, bool] | None:
    """(names that take positional arguments, in order; every name a keyword may bind; whether extra keywords go to
    a `**kwargs`) of `fn`, or None when it has `*args` or no readable signature (then `Signature.bind_partial`)."""
    sig = _signature(fn)
    if sig is None:
        return None
    positional, named, var_keyword = [], set(), False
    for name, p in sig.parameters.items():
        if p.kind == inspect.Parameter.VAR_POSITIONAL:
            return None
        if p.kind == inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
            continue
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            positional.append(name)
        if p.kind != inspect.Parameter.POSITIONAL_ONLY:
            named.add(name)
    return tuple(positional), frozenset(named), var_keyword


def _bound_arguments(fn, args: tuple, kwargs: dict) -> list[tuple[str, object]] | None:
    """The call's arguments by name, as `Signature.bind_partial` would give them (its `**kwargs` spread out), in a
    fraction of its time (it was half of describing a call: profiled in benchmarks/bench_call_agreement.py); None
    for a call it would refuse or a signature this does not cover."""
    parameters = _parameters(fn)
    if parameters is None:
        return None
    positional, named, var_keyword = parameters
    if len(args) > len(positional):
        return None
    items = list(zip(positional, args))
    taken = positional[:len(args)]
    for name in kwargs:
        if name in taken or (name not in named and not var_keyword):
            return None  # bound twice, or unknown: let bind_partial decide
    items.extend(kwargs.items())
    return items


def call_items(fn, args: tuple, kwargs: dict, *, skip_first: bool = False) -> list[tuple[str, object]]:
    """A call's arguments of `fn`, bound to their names (`**kwargs` spread out), in name order: the same order
    whatever order keywords came in."""
    function = getattr(fn, "__func__", fn)  # a bound method's function: the same object on every call
    if getattr(fn, "__self__", None) is not None:
        skip_first = True  # the cached signature is the function's, with `self`
        args = (None, *args)
    elif skip_first:
        args = (None, *args)
    items = _bound_arguments(function, args, kwargs)
    if items is not None:
        items = items[1:] if skip_first and args else items
    else:
        items = _bind_slowly(function, args, kwargs, skip_first)
    items.sort(key=_name)
    return items


def describe_items(items: list[tuple[str, object]]) -> dict:
    """A call's arguments (`call_items`), each described by `describe_value`: what a mismatch names."""
    out, checksums = {}, []
    for name, value in items:
        out[name] = describe_value(value, name, checksums)
    fill_checksums(checksums)
    return out


def arguments_fingerprint(items: list[tuple[str, object]], extra=None) -> str:
    """A fingerprint of a call's arguments (`call_items`) equal on every rank exactly when their descriptions
    (`describe_items`) are, hashed in one pass without building the description, which is built only to explain a
    mismatch. At a call's start the caches are cold from the previous call, and every operation there costs 5-10x
    its warm time: plain values (str, int, float, bool, None; by exact type) go into one `repr` as they are, plain
    contiguous CPU tensors (not `latents`, compared by shape) feed their bytes to the hash in place (`numpy()`: two
    operations a tensor where describing one took fourteen), everything else its `describe_value`. `extra`: more
    to fingerprint (the weights' checksums)."""
    hasher = hashlib.blake2b(digest_size=8)
    parts, checksums = [], []
    for name, value in items:
        kind = type(value)
        if kind is str or kind is int or kind is float or kind is bool or value is None:
            parts.append((name, value))
            continue
        if kind is torch.Generator:  # described by device only (`describe_value`): the ABC checks before it skipped
            parts.append((name, "generator", value.device.type))
            continue
        if kind is torch.Tensor and name not in BROADCAST_ARGS:
            try:  # raises for a tensor that needs grad, a conjugated or negated view, bf16, one off the CPU ...
                hasher.update(value.numpy())  # ... or one whose memory is not contiguous (BufferError)
                data = True
            except (RuntimeError, TypeError, ValueError, BufferError):
                data = cpu_tensor_bytes(value)  # the same bytes by the longer way (any layout hashes alike)
                if data is not None:
                    hasher.update(data)
            if data is not None:
                parts.append((name, value.shape, value.dtype))
                continue
        parts.append((name, describe_value(value, name, checksums)))
    fill_checksums(checksums)
    if extra is not None:
        parts.append(extra)
    hasher.update(repr(parts).encode())
    return hasher.hexdigest()


def _name(item: tuple) -> str:
    return item[0]


def _str_key(item: tuple) -> str:
    return str(item[0])


# The fingerprint of a call whose arguments are not checked (check_every_call=False): the same on every rank.
_NOTHING_CHECKED = "0" * 16


def _bind_slowly(function, args: tuple, kwargs: dict, skip_first: bool) -> list[tuple[str, object]]:
    sig = _signature(function)
    if sig is not None:
        try:
            bound = list(sig.bind_partial(*args, **kwargs).arguments.items())[1 if skip_first else 0:]
        except TypeError:
            bound = None
        if bound is not None:
            kinds = {name: p.kind for name, p in sig.parameters.items()}
            items = []
            for name, value in bound:
                if kinds.get(name) == inspect.Parameter.VAR_KEYWORD and isinstance(value, dict):
                    items.extend(value.items())
                else:
                    items.append((name, value))
            return items
    plain = args[1:] if skip_first else args
    return [(f"arg{i}", a) for i, a in enumerate(plain)] + list(kwargs.items())


def fill_checksums(checksums: list) -> None:
    """Read the pending checksums of one call's tensors in one transfer per device and put them in place."""
    by_device: dict = {}
    for entry in checksums:
        by_device.setdefault(entry[1].device, []).append(entry)
    for entries in by_device.values():
        values = torch.stack([c for _, c in entries]).tolist()
        for (description, _), value in zip(entries, values):
            description["checksum"] = value


class CallChecker:
    """The per-call agreement of one enabled pipeline or model: what to call it in errors, the group, which
    modules' weights to checksum on every call (`verify_weights`), and the call's random streams.

    One exchange per call: the arguments' fingerprint and the random states travel in the same sum all-reduce
    (`mesh.agree_start`'s `values` and `payload`), so each rank seeding its own generator needs no more; the
    arguments' descriptions are exchanged only when fingerprints differ (to say what differs), and rank 0's states
    broadcast only for calls with more generators than the exchange has room for."""

    def __init__(self, label: str, group=None, weight_modules: dict | None = None, timeout_s: float | None = None,
                 check_arguments: bool = True):
        self.label = label
        self.group = group
        self.weight_modules = weight_modules or {}
        self.timeout_s = timeout_s
        self.agree_in_call = True  # pipelines agree in the `__call__` wrapper; bare models in a forward pre-hook
        self.check_arguments = check_arguments  # False: check_every_call=False, only the random streams are agreed
        # `random_streams(wrapped, args, kwargs)` -> this call's random streams on this rank, an object with
        # `values` (the integers the exchange carries), `payload` (uint8 tensors it carries too, or None) and
        # `payload_bytes` (their room, the same on every call and rank), `after_agreement(table, payloads)` (every
        # rank's values and payloads: raises on every rank alike when they cannot be reconciled) and
        # `synchronize()` (run just before the call: rank 0's states where they differed); None: nothing random to
        # agree (bare models, broadcast_latents=False).
        self.random_streams = None
        self.calls = 0  # how many calls had their arguments agreed (tests and the benchmark count them)
        # Overlap the exchange with the call's local work before it first needs the ranks agreed (its tokenizing and
        # text encoding): settled at the first collective diffpar issues, parallel module forward or
        # prepare_latents (`mesh.settle_deferred`). False: waited for at the call's start.
        self.overlap = True
        self.pipeline_can_defer = False  # set for pipelines whose random draws start in prepare_latents
        self.draws_early = False  # learned: this pipeline drew random numbers before its first settle point
        # prepare_latents may draw the call's noise before the exchange is settled when the exchange is still in
        # flight there (its round trip then overlaps the work up to the first parallel module too: a call given
        # prompt embeddings has little else to overlap it with), when the random states travel in the exchange: a
        # rank whose states turn out to differ from rank 0's runs the call again (`_RestartCall`), on its own (no
        # collective ran in between), and learns to settle at prepare_latents (`settles_at_prepare`).
        self.settles_at_prepare = False
        self.speculated_calls = 0  # calls whose noise was drawn before their exchange was settled
        self._speculating = False  # the call in progress drew its noise before its exchange was settled
        self._inline_streams = False  # the call in progress carries its random states in its exchange
        self._streams = None  # the call in progress's random streams (asked at a speculation what moved before it)
        self.restarts = 0  # calls run again from rank 0's random states (`_RestartCall`)
        self.deferred_calls = 0
        self._pipeline_modules: dict[int, tuple[str, ...]] = {}
        self.last_seconds = 0.0  # the calling thread's time in the last call's agreement (the benchmark reads it)
        # True from the point the call in progress has its random streams agreed (rank 0's on every rank) to its
        # end: what the call then draws is the same on every rank (the latent broadcast reads it).
        self.streams_agreed = False
        self._buffers = None  # the exchange's reused row buffers (`mesh.AgreementBuffers`), from the first call on

    def agree(self, items: list | None, streams=None) -> None:
        """The call's one exchange, waited for now: the arguments (`call_items`; None: not checked) and `streams`'
        values, then rank 0's random states where they differ (bare models, and calls that cannot defer: `begin`)."""
        finish = self.begin(items, streams)
        if finish is not None:
            finish()

    def defers(self, pipe, streams) -> bool:
        """Whether this call's exchange may be settled late. Not when a module of the pipeline runs compiled (its
        hooks were traced: the settle points inside it would not run), nor once this pipeline was seen drawing
        random numbers before its first settle point while the ranks' states differed (`_RestartCall`)."""
        if not (self.overlap and self.pipeline_can_defer) or self.draws_early:
            return False
        modules = self._pipeline_modules.get(id(pipe))
        if modules is None:  # the names of the pipeline's modules, found once (a compiled one may replace one later)
            modules = self._pipeline_modules[id(pipe)] = tuple(
                name for name, value in vars(pipe).items() if isinstance(value, torch.nn.Module))
        if any_compiled(vars(pipe), modules):
            return False
        self.deferred_calls += 1
        return True

    def may_draw_before_settling(self) -> bool:
        """At prepare_latents with the call's exchange in flight: whether to draw the noise now and settle later
        (the exchange not completed yet, the states in the exchange, not learned otherwise). Rank-local: a rank
        that speculates wrongly restarts alone."""
        if self.settles_at_prepare or not self._inline_streams or mesh_lib.deferred_ready():
            return False
        self._speculating = True
        self.speculated_calls += 1
        self._streams.mark_speculation()  # a restart then tells a draw before prepare_latents from the noise's own
        return True

    def begin(self, items: list | None, streams=None):
        """Issue the call's one exchange and return what finishes it (waits, raises a mismatch on every rank, makes
        the random streams rank 0's), for the caller to run when the call first needs the ranks agreed; None when
        there is nothing to agree. `items`: the call's arguments (`call_items`), fingerprinted now and described
        only to explain a mismatch; None: not checked (check_every_call=False)."""
        self._speculating = False
        self._inline_streams = streams is not None and streams.payload is not None
        self._streams = streams
        if items is None and streams is None:
            return None
        if items is None:
            described, fp = {}, _NOTHING_CHECKED
        else:
            weights = {n: weights_checksum(m) for n, m in self.weight_modules.items()} or None
            fp = arguments_fingerprint(items, None if weights is None else ("weights", weights))

            def described() -> dict:  # only to explain a mismatch (`mesh._explain`)
                what = {"arguments": describe_items(items)}
                if weights is not None:
                    what["weights"] = weights
                return what
        pending = mesh_lib.agree_start(f"diffpar: a call of {self.label}", described, None, self.group,
                                       timeout_s=self.timeout_s,
                                       values=streams.values if streams is not None else (),
                                       fp=fp, issue_sum=issue_all_reduce_sum, buffers=self._buffers,
                                       payload=streams.payload if streams is not None else None,
                                       payload_bytes=streams.payload_bytes if streams is not None else 0)
        # Reused by the next call's exchange: those of the first exchange, or new ones when the checker's were still
        # held by an exchange never settled (an interrupted call).
        self._buffers = getattr(pending, "buffers", self._buffers)

        def finish() -> None:
            started = time.perf_counter()
            self._streams = None  # asked only before the settle; not kept past the call (its generators, its group)
            table = pending.settle()
            if items is not None:
                self.calls += 1
            if streams is not None:
                streams.after_agreement(table, None if pending.identical else pending.payloads())
                if streams.must_restart():
                    # What drew from the differing states: only the speculated noise (later calls settle before
                    # drawing it), or something before the settle point too (later calls agree at their start).
                    # Rank-local either way, and either way the same on every rank whatever the timing was.
                    if self._speculating and not streams.drawn_before_speculation():
                        self.settles_at_prepare = True
                    else:
                        self.draws_early = True
                    self.restarts += 1
                    raise _RestartCall()
                streams.synchronize()  # rank 0's random states where they differ (from the exchange)
                self.streams_agreed = True
            self.last_seconds += time.perf_counter() - started

        finish.arrived = pending.arrived  # whether settling would not wait (`mesh.deferred_ready`)
        return finish


# -- the call itself: `pipe(...)` and `model(...)` look `__call__` up on the class, so the class is patched, shared
# by its instances; the wrapper acts only on instances that carry a checker (others run untouched).

_CHECKER_ATTR = "_diffpar_call_checker"

# What gloo raises when a wait on a group ends unanswered: the group's timeout ran out, or a peer's process ended.
_PEER_FAILURE_TEXT = ("timed out waiting", "connection closed by peer", "connection reset by peer")


def collective_failure(exc: BaseException, label: str, timeout_s: float | None) -> DiffparError | None:
    """A clear error for a wait inside a collective that ended because a peer never came (or died), naming the
    collective, the code that issued it and the ranks of its group; None for any other exception.

    The wait itself was bounded by the group's timeout (every group diffpar creates carries `timeout_s`); this only
    says what happened, in place of gloo's bare "Timed out waiting 5000ms for recv operation to complete"."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not any(t in text.lower() for t in _PEER_FAILURE_TEXT):
        return None
    frames = list(traceback.walk_tb(exc.__traceback__))
    in_torch = [i for i, (f, _) in enumerate(frames) if "torch/distributed" in _slashes(f.f_code.co_filename)]
    if not in_torch:
        return None
    first = in_torch[0]
    collective = frames[first][0].f_code.co_name  # the torch.distributed entry point that waited
    callers = " > ".join(f"{f.f_code.co_name} ({_short_path(f.f_code.co_filename)}:{line})"
                         for f, line in frames[max(0, first - 2):first])
    ranks = ""
    for f, _ in reversed(frames):  # innermost first: the group the waiting collective ran on
        group = f.f_locals.get("group")
        if isinstance(group, dist.ProcessGroup):
            try:
                ranks = f" on the group of ranks {dist.get_process_group_ranks(group)}"
            except Exception:  # noqa: BLE001 (only for the message)
                ranks = ""
            break
    why = ("a peer's process ended" if "connection" in text.lower() else
           f"it did not complete within {f'timeout_s={timeout_s:g} s' if timeout_s else 'its timeout'}")
    return DiffparError(
        f"diffpar: a call of {label}: a collective{ranks} stopped waiting in {callers or 'torch'} > torch.distributed "
        f"{collective}: {why}. Another rank of that group raised earlier in this call, skipped the call, or runs a "
        "different script (its own error says why). ParallelismConfig(timeout_s=...) sets how long to wait. "
        f"({type(exc).__name__}: {text[:300]})"
    )


def _slashes(path: str) -> str:
    return path.replace("\\", "/")


def _short_path(path: str) -> str:
    parts = _slashes(path).split("/")
    for anchor in ("site-packages", "src"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + 1:])
    return "/".join(parts[-3:])


def _call_wrapper(wrapped, instance, args, kwargs):
    checker = vars(instance).get(_CHECKER_ATTR) if instance is not None and hasattr(instance, "__dict__") else None
    if checker is None:
        return wrapped(*args, **kwargs)
    # A bare model is agreed in its forward pre-hook, and runs straight from here: a model compiled whole traces
    # this wrapper, and each extra frame would count the pre-hook's one graph break again.
    try:
        if checker.agree_in_call:
            return _agreed_call(checker, wrapped, instance, args, kwargs)
        return wrapped(*args, **kwargs)
    except RuntimeError as exc:
        clear = collective_failure(exc, checker.label, checker.timeout_s)
        if clear is None:
            raise
        raise clear from exc


def _agreed_call(checker: "CallChecker", wrapped, instance, args, kwargs):
    """A pipeline call: its exchange issued now and settled where the call first needs the ranks agreed."""
    mesh_lib.settle_deferred()  # an enclosing call's exchange, if one is still in flight
    enclosing = checker.streams_agreed
    checker.streams_agreed = False
    try:
        return _run_agreed(checker, wrapped, instance, args, kwargs)
    finally:
        checker.streams_agreed = enclosing


def _run_agreed(checker: "CallChecker", wrapped, instance, args, kwargs):
    started = time.perf_counter()
    # Outside the `try` below: the agreement's own errors (a timeout, a mismatch) already say what happened.
    streams = checker.random_streams(wrapped, args, kwargs) if checker.random_streams is not None else None
    finish = checker.begin(call_items(wrapped, args, kwargs) if checker.check_arguments else None, streams)
    deferred = finish is not None and checker.defers(instance, streams)
    if deferred:
        # settled where the call first needs it (`mesh.settle_deferred`)
        mesh_lib.defer_settle(finish, finish.arrived)
    checker.last_seconds = time.perf_counter() - started  # `finish` adds its own time
    if finish is None:
        return wrapped(*args, **kwargs)
    if not deferred:
        finish()
    try:
        result = wrapped(*args, **kwargs)
        mesh_lib.settle_deferred()  # a call that reached no settle point (ran nothing parallel) still agrees
    except _RestartCall:
        # Draws before the settle point came from each rank's own state: every rank runs the call again from its
        # start, with rank 0's states (nothing the first attempt did outlives it: no collective ran before).
        streams.restart_from_rank0()
        checker.streams_agreed = True
        return wrapped(*args, **kwargs)
    except Exception as exc:
        # The exchange still in flight when the call failed before its first settle point: finish it, so it never
        # outlives the call; a mismatch is the cause to report (the others raise it too).
        if mesh_lib.deferred_pending():
            try:
                mesh_lib.settle_deferred()
            except DiffparError as mismatch:
                raise mismatch from exc
            except _RestartCall:
                pass  # the call failed anyway: its own error is the outcome
        raise
    except BaseException:
        mesh_lib.discard_deferred()  # interrupted (Ctrl-C): no wait on the way out; the process is ending
        raise
    return result


class _ClassCallPatches:
    """One patch of `cls.__call__` per class (a pipeline's, or a bare model's), kept while any enabled instance of
    it needs it; the wrapper checks only instances that carry a checker (others run untouched)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._patches: dict[type, tuple[Patch, int]] = {}

    def acquire(self, cls: type) -> None:
        with self._lock:
            patch, users = self._patches.get(cls, (None, 0))
            if patch is None:
                patch = Patch(cls, "__call__", _call_wrapper, label=f"{cls.__name__}.__call__")
            self._patches[cls] = (patch, users + 1)

    def release(self, cls: type) -> None:
        with self._lock:
            patch, users = self._patches.get(cls, (None, 0))
            if patch is None:
                return
            if users <= 1:
                patch.undo()
                del self._patches[cls]
            else:
                self._patches[cls] = (patch, users - 1)


CLASS_CALL_PATCHES = _ClassCallPatches()


def _attach_to_calls(target, checker: "CallChecker", handle, what: str) -> None:
    """Put `checker` on `target`'s calls (the class patch plus the instance attribute); undo recorded first."""
    cls = type(target)
    state = {"acquired": False}

    def undo():
        vars(target).pop(_CHECKER_ATTR, None)
        if state["acquired"]:
            CLASS_CALL_PATCHES.release(cls)

    handle.add(what, undo)
    CLASS_CALL_PATCHES.acquire(cls)
    state["acquired"] = True
    vars(target)[_CHECKER_ATTR] = checker  # not setattr: nn.Module's would look for parameters and submodules


def attach_pipeline_checker(pipe, checker: CallChecker, handle) -> None:
    """Agree on every call of `pipe(...)`, and name the collective when a wait inside the call fails."""
    checker.agree_in_call = True
    _attach_to_calls(pipe, checker, handle, f"pipeline: agree on every call ({type(pipe).__name__})")


def attach_model_checker(model: torch.nn.Module, checker: CallChecker, handle) -> None:
    """Agree on every call of a bare model (a forward pre-hook that sees the whole inputs, before any split), and
    name the collective when a wait inside the call fails (the class's `__call__`)."""
    removable = []
    handle.add(f"{checker.label}: agree on every call", lambda: [r.remove() for r in removable])
    forward = type(model).forward

    # Run eagerly under torch.compile(model): the agreement is host work (checksums read as floats, JSON, a
    # gloo exchange) that dynamo would otherwise split into ~20 graphs. Disabled, it costs one graph break at the
    # very start of the forward, before any tensor work (docs/compile.md); in a pipeline the agreement wraps the
    # pipeline call instead and the compiled transformer has no break from it.
    @torch.compiler.disable
    def hook(module, args, kwargs):
        checker.agree(call_items(forward, args, kwargs, skip_first=True))

    # prepend: before diffusers' own hooks and any split, so every rank describes the same whole inputs
    removable.append(model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))
    checker.agree_in_call = False
    _attach_to_calls(model, checker, handle, f"{checker.label}: name a collective that failed")
