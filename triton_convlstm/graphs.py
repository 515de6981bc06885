"""CUDA-graph capture of whole time loops: the policy (which layers are worth capturing), a
small bounded cache of captured graphs, and its entries' interface.

A layer's forward (or backward) over T steps is 2T+ small launches; replaying them as one graph
removes the per-launch CPU cost that dominates small shapes. Each entry owns static copies of its
inputs and outputs: a call copies its inputs in, replays, and clones the outputs out, so nothing a
caller holds is overwritten by a later replay, and one entry can serve every call with the same
shapes. The exceptions are asked for by name (``keep``): eager training keeps the saved
activations in the forward entry's buffers and checks the entry's ``generation`` before reading,
and ConvLSTM.forward takes the last layer's outputs (every layer's, in inference) uncloned and
copies what it returns at once (not for bidirectional layers, whose two directions may replay
the same entry one after the other). The first call for a new signature runs eagerly (that compiles
the Triton kernels and lets cuDNN pick its algorithms); the second captures. A module's own
training entries (:func:`slot_of`) are dropped once the module is collected, and shared
(inference) entries once all the modules that used them are.

One entry serves every call with its signature (inference entries are shared by all layers and
modules with the same shapes), so calls from several threads take turns: :data:`LOCK` is held
from copy-in to clone-out, and by callers while they read static outputs they kept. A call on
another CUDA stream than the entry's last waits for that stream's work on the buffers first.
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Container, Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .backend import cudnn_conv_tf32, exporting

# Above this many state elements per step (B*hidden*H*W), the GPU work of a step hides its launch
# cost, so replaying a graph saves little and its static buffers cost memory.
MAX_STATE_ELEMENTS = 1 << 23


# While a cache is thrashing, a signature called this many times uncaptured is captured anyway.
HOT_CALLS = 8


# Tests set this to run the cache on CPU with an emulated graph (replay = rerun the function and
# overwrite the static outputs in place, as a real replay does), so the caching, copying and
# cloning logic is exercised where there is no GPU.
EMULATE_ON_CPU = False


# One lock for every entry of both caches. Reentrant: a backward holding it may replay the forward.
LOCK = threading.RLock()


def exclusive(x: torch.Tensor, use_graphs: bool) -> contextlib.AbstractContextManager:
    """The context for a caller that will read static outputs of captured loops on x (kept
    ones, not clones) after the call that replayed them.

    Args:
        x: the model's input, any shape; its device decides (:func:`can_capture`).
        use_graphs: whether any of the caller's layers runs from captured graphs.

    Returns:
        :data:`LOCK` where loops on x are captured; a no-op context otherwise, and while
        torch.compile traces (its path gets clones, and the lock is taken inside the op).
    """
    if use_graphs and not torch.compiler.is_compiling() and can_capture(x):
        return LOCK
    return contextlib.nullcontext()


def can_capture(x: torch.Tensor) -> bool:
    """Whether loops on x may be captured: only on CUDA, and never inside someone else's
    capture (then the outer graph, e.g. torch.compile's reduce-overhead mode, records our
    launches itself). On CPU: :data:`EMULATE_ON_CPU`.

    Args:
        x: any tensor; its device (and the current stream's capture state) is read.
    """
    if x.device.type == "cpu":
        return EMULATE_ON_CPU
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


def worth_capturing(batch: int, hidden: int, *spatial: int) -> bool:
    """Whether a layer's step is small enough that its launches, not its GPU work, cost most.

    Args:
        batch, hidden, spatial: the step's state shape (B, hidden, *spatial).

    Returns:
        True where B*hidden*prod(spatial) is at most :data:`MAX_STATE_ELEMENTS`.

    >>> worth_capturing(4, 64, 64, 64), worth_capturing(64, 256, 256, 256)
    (True, False)
    """
    return batch * hidden * math.prod(spatial) <= MAX_STATE_ELEMENTS


def capture_plan(enabled: bool, batch: int, hidden_dims: list[int],
                 spatial: Sequence[int]) -> list[bool]:
    """Which of a model's layers run from captured graphs: all that are
    :func:`worth_capturing` where ``enabled``, none while an exporter captures the model (with a
    dynamic batch, turning the size tests into a bool would be a guard; the exported loop is
    standard ops anyway).

    Args:
        enabled: the module's ``cuda_graphs``.
        batch: B.
        hidden_dims: each layer's hidden channels.
        spatial: the frames' sizes (1 to 3).

    Returns:
        One bool per layer, in the order of ``hidden_dims``.
    """
    if not enabled or exporting():
        return [False] * len(hidden_dims)
    return [worth_capturing(batch, hid, *spatial) for hid in hidden_dims]


def owner_slot(module: torch.nn.Module, captured: bool, x: torch.Tensor) -> int | None:
    """The slot a layer's own training captures are kept under.

    Args:
        module: the layer's module (its cell).
        captured: the layer's entry in :func:`capture_plan`.
        x: the layer's input, any shape; its device is read (:func:`can_capture`).

    Returns:
        ``slot_of(module)``, or None where it captures nothing: not captured, or traced by
        torch.compile (the compiled path runs the op, which keeps no per-module entries;
        is_compiling first: dynamo must not trace can_capture's CUDA query).
    """
    if torch.compiler.is_compiling() or not captured or not can_capture(x):
        return None
    return slot_of(module)


def _signature(args) -> tuple:
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append((tuple(a.shape), a.stride(), a.dtype, a.device))
        else:
            sig.append(a)
    return tuple(sig)


def _backend_flags() -> tuple:
    """Settings that change which convolution algorithms a capture bakes in."""
    cudnn = torch.backends.cudnn
    return (cudnn.enabled, cudnn.deterministic, cudnn.benchmark, cudnn_conv_tf32(),
            torch.are_deterministic_algorithms_enabled())


class GraphEntry:
    """One captured call.

    What its users may touch: :meth:`replay`, the static buffers (``static_inputs``,
    ``static_outputs``: the capture reads and writes these), ``generation`` and
    :meth:`mark_consumed` (whether the static outputs still hold a given replay's values), and
    ``dropped`` (out of its cache: make no new keys on it).

    Making one on CUDA runs ``fn`` once uncaptured (a warm-up on a side stream), then captures
    it; emulated on CPU, it runs ``fn`` once, which makes the static outputs.

    Args:
        fn: the loop: takes ``*args``, returns a tuple or list of tensors (the static outputs).
        args: the call's arguments: tensors (at least one; the first gives the device), None
            or other values, which the capture bakes in.
        shared: argument positions used as they are (they already live in another entry's
            static buffers); the others are copied into static tensors per call: clones, or
            for positions in ``layouts`` what that function makes.
        layouts: argument position -> function making its static tensor from the argument (a
            tensor in the layout the captured code reads best, so the per-call copy-in also
            does the layout change), or None.
    """

    def __init__(
        self,
        fn: Callable[..., Sequence[torch.Tensor]],
        args: Sequence[Any],
        shared: Iterable[int] = (),
        layouts: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ) -> None:
        self.shared = frozenset(shared)
        layouts = layouts or {}
        self.static_inputs = [
            layouts.get(i, torch.clone)(a)
            if isinstance(a, torch.Tensor) and i not in self.shared else a
            for i, a in enumerate(args)
        ]
        self.fn, self.graph, self._generation, self.stream = fn, None, 0, None
        self.owner = None  # GraphCache.run_with_entry's owner
        self.users: set[int] | None = None  # and its users (slots), for entries shared by them
        self.replays = 0
        # Out of its cache (evicted, or its module collected) while someone still holds it (a
        # pending backward): such a holder must not make new cache keys on it.
        self.dropped = False
        first = next(a for a in self.static_inputs if isinstance(a, torch.Tensor))
        if not first.is_cuda:  # EMULATE_ON_CPU
            self.static_outputs = fn(*self.static_inputs)
            return
        side = torch.cuda.Stream(device=first.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture, on the capture's stream kind
            fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls other threads make meanwhile (their own uncaptured models,
        # allocations) do not invalidate this capture; this thread makes none that would.
        # On the warm-up's stream, which is on x's device: without a stream torch captures on
        # one process-wide stream made on the device of the first capture ever, so a capture
        # on another GPU would record nothing (its kernels would run uncaptured).
        with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
            self.static_outputs = fn(*self.static_inputs)
        self.stream = torch.cuda.current_stream()

    @property
    def generation(self) -> int:
        """Counts replays (and consumptions): a reader that noted it at a replay can tell
        whether the static outputs still hold that replay's values."""
        return self._generation

    def mark_consumed(self) -> None:
        """The static outputs were overwritten outside a replay (a backward that writes its
        gradients over the saved gates): readers holding the current generation must replay."""
        self._generation += 1

    def replay(self, args: Sequence[Any], keep: Container[int] = ()) -> list[torch.Tensor]:
        """Copy args in, replay, and return the outputs.

        A call on another CUDA stream than the last replay's waits for that stream first.

        Args:
            args: as at construction, same signature; tensors at positions not ``shared`` are
                copied into the static inputs (unless they are those tensors).
            keep: output positions to return uncloned.

        Returns:
            The outputs: clones, except positions in ``keep``, which are the static buffers
            themselves (valid until the next replay: ``generation`` counts replays so a reader
            can tell), and empty ones, which hold nothing a replay could change.
        """
        if self.graph is not None:
            stream = torch.cuda.current_stream()
            if stream != self.stream:  # the last user's reads and writes of the buffers first
                stream.wait_stream(self.stream)
                self.stream = stream
        for i, (dst, src) in enumerate(zip(self.static_inputs, args)):
            if isinstance(dst, torch.Tensor) and i not in self.shared and dst is not src:
                dst.copy_(src)
        if self.graph is not None:
            self.graph.replay()
        else:  # emulated: write as a replay does, without autograd seeing a version bump
            for dst, src in zip(self.static_outputs, self.fn(*self.static_inputs)):
                with torch.autograd._unsafe_preserve_version_counter(dst):
                    dst.copy_(src)
        self._generation += 1
        self.replays += 1
        # An empty output (a gradient nobody asked for) holds no data a replay could change.
        return [t if i in keep or t.numel() == 0 else t.clone()
                for i, t in enumerate(self.static_outputs)]


class GraphCache:
    """LRU cache of captured loops keyed by the call's configuration and argument signature.

    Args:
        max_entries: captured entries kept; the least recently used go first.
        max_seen: first (uncaptured) calls remembered, so that their second call captures.
    """

    def __init__(self, max_entries: int = 32, max_seen: int = 4096) -> None:
        self.max_entries = max_entries  # a deep model holds ~3 entries per layer
        self.entries: OrderedDict[tuple, GraphEntry] = OrderedDict()
        # First (uncaptured) calls: key -> owner, oldest first. Bounded, or a long-lived process
        # that keeps meeting new shapes (a server fed images of any size) would grow it for
        # ever; a signature forgotten here only runs uncaptured once more when it comes back.
        self.max_seen = max_seen
        self.seen: dict[tuple, object] = {}
        self.captures = 0  # for tests: how many captures happened
        self.evictions = 0
        self.wasted = 0  # evictions in a row of entries never replayed after their capture
        self.uncaptured: dict[tuple, int] = {}  # calls left uncaptured while thrashing, per key
        # The cache whose keys hold this one's entries (the backward's hold the forward entry
        # whose buffers they read): entries dropped here take theirs along.
        self.dependents: GraphCache | None = None

    def clear(self) -> None:
        """Drop every entry (each marked ``dropped``) and forget the first calls and the
        eviction counts. Not :attr:`dependents`' entries: :func:`clear` clears both caches."""
        with LOCK:  # not under another thread's replay
            for e in self.entries.values():  # a pending backward may still hold one
                e.dropped = True
            self.entries.clear()
            self.seen.clear()
            self.uncaptured.clear()
            self.evictions = self.wasted = 0

    def drop(self, owner: int | None = None,
             uses: Collection[GraphEntry] = ()) -> list[GraphEntry]:
        """Forget the entries (and first calls) of ``owner``, the shared entries it was the last
        user of, and those whose key holds one of the entries in ``uses``. The entries whose
        keys hold the dropped ones, in :attr:`dependents`, go too.

        Args:
            owner: a :func:`slot_of` value, or None.
            uses: entries (of another cache) that keys here may hold.

        Returns:
            The entries dropped, each marked ``dropped`` (their buffers go with them).
        """
        def match(full_key, own):
            return (owner is not None and own == owner) or any(
                part is e for part in full_key[0] for e in uses)

        def last_user_gone(e):
            if owner is None or not e.users or owner not in e.users:
                return False
            e.users.discard(owner)
            return not e.users
        with LOCK:
            gone = [k for k, e in self.entries.items() if last_user_gone(e) or match(k, e.owner)]
            self.seen = {k: own for k, own in self.seen.items() if not match(k, own)}
            self.uncaptured = {k: n for k, n in self.uncaptured.items() if k in self.seen}
            dropped = [self.entries.pop(k) for k in gone]
            for e in dropped:
                e.dropped = True
            if dropped and self.dependents is not None:
                self.dependents.drop(uses=dropped)
            return dropped

    def thrashing(self) -> bool:
        """More signatures in rotation than entries: every call would capture anew (a warm-up
        run, a capture and a synchronisation each), so new signatures run uncaptured instead
        (but for hot ones, :meth:`_hot`). Told by more than max_entries evictions in a row of
        entries never reused: a process that moves on from shapes it used many times (a sweep,
        models made one after another) is not thrashing, however many it evicts."""
        return self.wasted > self.max_entries

    def _hot(self, full_key) -> bool:
        """While thrashing, a signature called HOT_CALLS times uncaptured is captured all the
        same: the workload may have settled on new shapes, which would otherwise never be."""
        calls = self.uncaptured.get(full_key, 0) + 1
        self.uncaptured[full_key] = calls
        return calls >= HOT_CALLS

    def run(self, fn: Callable[..., Sequence[torch.Tensor]], args: Sequence[Any],
            key: tuple[Hashable, ...],
            layouts: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
            keep: Container[int] = (), user: int | None = None) -> Sequence[torch.Tensor]:
        """fn(*args), replayed from a capture from the second call with this key and signature
        on (the signature: the args' shapes, strides, dtypes and devices, their other values,
        and the cuDNN and determinism settings a capture bakes in).

        Args:
            fn: the loop, as in :class:`GraphEntry`.
            args: its arguments.
            key: hashable configuration the args do not show (e.g. the LayerSpec).
            layouts: as in :class:`GraphEntry`.
            keep: output positions to return uncloned.
            user: a :func:`slot_of` value, not part of the key; the entry is dropped once all
                its users are collected.

        Returns:
            fn's outputs: fresh tensors (clones of the static outputs), except positions in
            ``keep``: the static outputs themselves, valid until the next replay of the entry.
        """
        return self.run_with_entry(fn, args, key, layouts=layouts, keep=keep, user=user)[0]

    def run_with_entry(
        self,
        fn: Callable[..., Sequence[torch.Tensor]],
        args: Sequence[Any],
        key: tuple[Hashable, ...],
        *,
        shared: Iterable[int] = (),
        keep: Container[int] = (),
        layouts: Mapping[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
        before_replay: Callable[[], object] | None = None,
        owner: int | None = None,
        user: int | None = None,
    ) -> tuple[Sequence[torch.Tensor], GraphEntry | None]:
        """As :meth:`run`, also returning the entry that replayed.

        Args:
            fn, args, key, keep, layouts, user: as in :meth:`run`.
            shared: as in :class:`GraphEntry`.
            before_replay: called between a capture and its first replay: capturing runs fn
                once, which matters for fns that consume their (shared) inputs.
            owner: a :func:`slot_of` value, part of the key; the entry is dropped when that
                module is collected.

        Returns:
            (outputs, entry): the outputs as :meth:`run` returns them, and the entry that
            replayed (None for an uncaptured call).
        """
        with LOCK:
            if _COLLECTED:
                release_collected()
            out, entry = self._run_with_entry(fn, args, key, shared, keep, layouts,
                                              before_replay, owner)
            if entry is not None and user is not None:  # a set made once, not per call
                if entry.users is None:
                    entry.users = set()
                entry.users.add(user)
            return out, entry

    def _run_with_entry(self, fn, args, key, shared, keep, layouts, before_replay, owner):
        full_key = ((*key, owner), _backend_flags(), _signature(args))
        entry = self.entries.get(full_key)
        if entry is None:
            first = full_key not in self.seen
            if first or (self.thrashing() and not self._hot(full_key)):
                self.seen[full_key] = owner
                while len(self.seen) > max(self.max_seen, 1):  # never the key just added
                    oldest = next(iter(self.seen))
                    del self.seen[oldest]
                    self.uncaptured.pop(oldest, None)
                return fn(*args), None
            self.uncaptured.pop(full_key, None)
            # Static copies made here must be ordinary tensors even when this call runs under
            # inference_mode: a later call under no_grad copies into them. (inference_mode(False)
            # turns grad mode back on, hence no_grad.)
            with torch.inference_mode(False), torch.no_grad():
                entry = GraphEntry(fn, args, shared, layouts)
            entry.owner = owner
            self.captures += 1
            self.entries[full_key] = entry
            if before_replay is not None:
                before_replay()
            while len(self.entries) > self.max_entries:
                _, evicted = self.entries.popitem(last=False)
                evicted.dropped = True
                self.evictions += 1
                # In a row: one evicted after paying off says the entries do get reused.
                self.wasted = self.wasted + 1 if evicted.replays <= 1 else 0
                if self.dependents is not None:  # their keys would keep its buffers alive
                    self.dependents.drop(uses=[evicted])
                if self.thrashing():
                    warnings.warn(
                        f"triton_convlstm: more than {self.max_entries} input signatures are in "
                        "rotation; new ones now run without CUDA graphs. Raise "
                        "triton_convlstm.graphs.FORWARD.max_entries / BACKWARD.max_entries, "
                        "or pass cuda_graphs=False.", stacklevel=2)
        else:
            self.entries.move_to_end(full_key)
        out = entry.replay(args, keep)
        return (tuple(out) if isinstance(entry.static_outputs, tuple) else out), entry


FORWARD = GraphCache()
BACKWARD = GraphCache()
FORWARD.dependents = BACKWARD


def clear() -> None:
    """Drop every captured graph (frees their static buffers)."""
    FORWARD.clear()
    BACKWARD.clear()


_WATCHED: set[int] = set()  # slots with a finalizer on their module
_COLLECTED: list[int] = []  # slots of collected modules whose entries are still to drop


def slot_of(module: torch.nn.Module) -> int:
    """The cache slot of a module's own captured loops (training keeps its saved activations in
    them).

    Once the module is collected, its entries, and the backward entries that read their
    buffers, are dropped at the next call into the cache (or by :func:`release_collected`):
    their static buffers (several activations' worth) go then, not when the LRU gets to them,
    and a new module that reuses the id cannot find them.

    Args:
        module: the layer's module (weak-referenceable; a finalizer is registered on it once).

    Returns:
        Its id, valid while it lives.
    """
    slot = id(module)
    if slot not in _WATCHED:
        _WATCHED.add(slot)
        weakref.finalize(module, _collected, slot).atexit = False  # nothing to free at exit
    return slot


def _collected(slot: int) -> None:
    # Runs when the collector frees the module: possibly in the middle of a loop over the
    # caches in this very thread, so it only takes note (list and set operations are atomic).
    _WATCHED.discard(slot)
    _COLLECTED.append(slot)


def release_collected() -> None:
    """Drop the entries of modules collected since the last call (every graph call starts with
    this; call it to free their memory before then)."""
    with LOCK:
        while _COLLECTED:
            FORWARD.drop(owner=_COLLECTED.pop())  # the backward's go through FORWARD.dependents
