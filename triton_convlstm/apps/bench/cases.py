"""What the benchmarks measure: shapes, the implementations compared, one step of each, timers.

Shared by the ``bench`` command (:mod:`.command`), the perf-regression suite
(``bench/test_perf.py``) and ``bench/gpu_check.py``, so all three time the same thing.

>>> step = build_step("layer", SHAPES["cpu-s"], "fp32", "train", torch.device("cpu"))
>>> timing = time_step(step, torch.device("cpu"), reps=3)
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .baseline import EagerConvLSTM
from .memory import TensorMemoryTracker

if TYPE_CHECKING:
    from ...modules import ConvLSTM


@dataclass(frozen=True)
class Shape:
    """``layers`` layers (one unless said), kernel 3: x is (batch, steps, in_dim, *spatial),
    hidden channels ``hidden`` in every layer (in each direction when ``bidirectional``).

    Args:
        name: the key in SHAPES, and the shape's name in result rows.
        batch: B.
        steps: sequence length T.
        in_dim: input channels C.
        hidden: hidden channels of every layer.
        size: the frame: an int is a square 2-d frame, H = W = size (every shape before the
            1-d and 3-d layers, whose rows and labels stay as they were); a tuple gives each
            spatial dim, 1 to 3 of them: (L,), (H, W) or (D, H, W).
        kernel: kernel side (in every spatial dim).
        layers: stacked ConvLSTM layers.
        bidirectional: each layer also runs a reverse direction; outputs have 2*hidden channels.
    """

    name: str
    batch: int
    steps: int
    in_dim: int
    hidden: int
    size: int | tuple[int, ...]
    kernel: int = 3
    layers: int = 1
    bidirectional: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) and not 1 <= len(self.size) <= 3:
            raise ValueError(f"Shape {self.name}: size: expected an int or 1 to 3 sizes, "
                             f"got {self.size}")

    def with_steps(self, steps: int) -> Shape:
        """This shape with another sequence length (the T sweep).

        Args:
            steps: the new T.

        Returns:
            A copy with ``steps`` replaced; the name stays.
        """
        return replace(self, steps=steps)

    @property
    def spatial(self) -> tuple[int, ...]:
        """The frame's sizes, one per spatial dim: (size, size) for an int ``size``."""
        return (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)

    @property
    def dims(self) -> int:
        """The number of spatial dims (1, 2 or 3): which layer and convolution run."""
        return len(self.spatial)

    @property
    def out_channels(self) -> int:
        """Channels of the output sequence: hidden, twice that when bidirectional."""
        return 2 * self.hidden if self.bidirectional else self.hidden

    def x_size(self) -> tuple[int, ...]:
        """The input's size.

        Returns:
            (batch, steps, in_dim, *spatial): batch-first, as both models read it.
        """
        return (self.batch, self.steps, self.in_dim, *self.spatial)

    @property
    def label(self) -> str:
        """The sizes as text, e.g. ``B4-T16-C8-H32-32x32`` (``-L3`` appended for 3 layers,
        ``-bi`` for a bidirectional shape; a 1-d frame is its length alone, ``-256``)."""
        deep = f"-L{self.layers}" if self.layers > 1 else ""
        bi = "-bi" if self.bidirectional else ""
        return (f"B{self.batch}-T{self.steps}-C{self.in_dim}-H{self.hidden}-"
                f"{'x'.join(map(str, self.spatial))}{deep}{bi}")


SHAPES = {
    s.name: s
    for s in (
        Shape("S", 4, 16, 8, 32, 32),
        Shape("M", 16, 16, 32, 64, 64),
        Shape("L", 16, 10, 64, 128, 128),
        Shape("cpu-s", 2, 8, 4, 16, 16),
        Shape("cpu-m", 4, 8, 8, 32, 24),
        # Where saved activations add up across layers (the memory gates; not timed in CI).
        Shape("cpu-deep", 4, 8, 8, 32, 24, layers=3),
        # The rest of the family (ConvLSTM1d, ConvLSTM3d, bidirectional), each against the
        # formulation written the popular way for its n (baseline.py). On GPU: a long 1-d
        # signal, a small volume sequence, and M in both directions (twice M's work).
        Shape("1d", 32, 64, 16, 128, (256,)),
        Shape("3d", 2, 8, 4, 32, (16, 32, 32)),
        Shape("M-bi", 16, 16, 32, 64, 64, bidirectional=True),
        # Their CPU counterparts for the perf suite: a step takes milliseconds on one thread.
        Shape("cpu-1d", 4, 8, 4, 16, (64,)),
        Shape("cpu-3d", 1, 4, 2, 8, (8, 8, 8)),
        Shape("cpu-s-bi", 2, 8, 4, 16, 16, bidirectional=True),
        # Issue 17's inference shapes, as a new user tried them: a deep small-channel stack
        # over long sequences, and a wide one.
        Shape("cpu-inf-deep", 2, 32, 1, 16, 64, layers=3),
        Shape("cpu-inf-wide", 8, 16, 16, 64, 32, layers=2),
        # Few hidden channels on larger frames with a one-channel input (radar echoes): the C
        # gate kernels' rows shorter than a vector and the [x, h] concatenation's layout.
        Shape("cpu-hid8", 1, 16, 1, 8, 64),
    )
}
GPU_SHAPES = ("S", "M", "L")
CPU_SHAPES = ("cpu-s", "cpu-m")
# Kept out of the tuples above, which are the 2-d goals' cases (test_perf's GPU_GOALS) and the
# bench command's defaults: bench/gpu_check.py runs these in a capped phase of their own, and
# the perf suite gates them with their own margins.
FAMILY_GPU_SHAPES = ("1d", "3d", "M-bi")
FAMILY_CPU_SHAPES = ("cpu-1d", "cpu-3d", "cpu-s-bi")
# "layer-nographs": the layer with its CUDA-graph replay off (what the graphs buy, per shape);
# "layer-recompute": with recompute_gates=True (what the memory it saves costs in time);
# "layer-fused": one Triton kernel per forward step (LayerSpec.fused; on CPU the same as layer);
# "layer-fused-nographs": that without graphs (a profile then sees each kernel);
# "layer-compiled-ro": the layer under torch.compile(mode="reduce-overhead"), its own graphs off:
# cudagraph trees capture the op, the loss and the backward around it, which a user can do too.
# "layer-lengths": the layer on the same padded batch told each sample's length (T down to
# about T/2, :func:`mixed_lengths`): what the variable-length masking costs over "layer".
# "layer-compiled": the layer under torch.compile's default mode (its graphs off): what
# compiling a model that holds it gives or costs.
LAYER_IMPLS = ("layer", "layer-nographs", "layer-recompute", "layer-fused",
               "layer-fused-nographs", "layer-compiled-ro", "layer-lengths", "layer-compiled")
IMPLS = ("eager", "compiled", "compiled-ro", *LAYER_IMPLS, "convs-only")
COMPILED_IMPLS = ("compiled", "compiled-ro")  # the formulation compiled: the goals' baselines
CUDA_ONLY_IMPLS = ("compiled-ro", "layer-compiled-ro")  # reduce-overhead means CUDA graphs
MODES = ("fwd", "train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _layer_class(dims: int = 2):
    """The package's layer for ``dims`` spatial dims (ConvLSTM1d, ConvLSTM, ConvLSTM3d)."""
    # Imported late: the bench command's argument checks and `compare` need no layer at all.
    from ...modules import ConvLSTM, ConvLSTM1d, ConvLSTM3d

    return {1: ConvLSTM1d, 2: ConvLSTM, 3: ConvLSTM3d}[dims]


def make_models(shape: Shape, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> tuple[EagerConvLSTM, ConvLSTM]:
    """The eager formulation and the layer with the same weights (the layer loads eager's
    state_dict), both on ``device`` in ``dtype``.

    Args:
        shape: channels, kernel and layers of both models.
        device: where both go.
        dtype: their parameters' dtype.
        seed: seeds the weights (torch.manual_seed, the global generator).

    Returns:
        (eager, layer): an :class:`~.baseline.EagerConvLSTM` and a batch-first
        :class:`triton_convlstm.ConvLSTM` (``ConvLSTM1d``, ``ConvLSTM3d`` for 1-d and 3-d
        shapes), both bidirectional where the shape is.
    """
    torch.manual_seed(seed)
    eager = EagerConvLSTM(shape.in_dim, shape.hidden, shape.kernel, shape.layers,
                          spatial_dims=shape.dims, bidirectional=shape.bidirectional)
    layer = _layer_class(shape.dims)(shape.in_dim, shape.hidden, shape.kernel, shape.layers,
                                     batch_first=True, bidirectional=shape.bidirectional)
    # strict: a parameter one side lacks (a reverse stack, say) fails here, not in a timing.
    layer.load_state_dict(eager.state_dict(), strict=True)
    return eager.to(device, dtype), layer.to(device, dtype)


def _configure(layer, impl: str) -> None:
    """The layer's switches for a LAYER_IMPLS name (the others get the plain layer)."""
    switches = set(impl.split("-")[1:]) if impl in LAYER_IMPLS else set()
    layer.cuda_graphs = not switches & {"nographs", "compiled"}
    layer.recompute_gates = "recompute" in switches
    layer.fused_forward = "fused" in switches


def mixed_lengths(batch: int, steps: int) -> torch.Tensor:
    """The "layer-lengths" case's lengths: from T for the first sample down to T - T // 2 for
    the last, evenly (T alone for a batch of one).

    >>> mixed_lengths(4, 8).tolist()
    [8, 7, 6, 4]
    """
    return steps - torch.arange(batch) * (steps // 2) // max(batch - 1, 1)


def _sequence_of(impl: str, model) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the (B, T, hidden, *spatial) output sequence, whichever output convention ``model``
    has."""
    if impl in LAYER_IMPLS:

        def run(x):
            lengths = mixed_lengths(x.shape[0], x.shape[1]) if impl == "layer-lengths" else None
            outs, _ = model(x, lengths=lengths)
            return outs[-1] if isinstance(outs, (list, tuple)) else outs

        return run
    return lambda x: model(x)[0]


def build_step(
    impl: str, shape: Shape, dtype: str, mode: str, device: torch.device, seed: int = 0
) -> Callable[[], None]:
    """A closure running one forward ("fwd", under no_grad) or one training step ("train": forward,
    MSE loss, gradients w.r.t. the parameters and the input) of ``impl``. Its first calls compile
    or capture where the implementation does; call it a few times before timing.

    Args:
        impl: one of IMPLS.
        shape: the case's sizes; x is (batch, steps, in_dim, *spatial).
        dtype: a key of DTYPES ("fp32", "bf16").
        mode: "fwd" or "train".
        device: where the models and tensors live; CUDA_ONLY_IMPLS need a CUDA one.
        seed: seeds the weights and the random input (and target).

    Returns:
        The step, a function of no arguments.

    Raises:
        ValueError: for an unknown impl, mode or dtype, or a CUDA-only impl on another device.
    """
    if impl not in IMPLS or mode not in MODES or dtype not in DTYPES:
        raise ValueError(f"unknown case {impl}/{mode}/{dtype}")
    if impl in CUDA_ONLY_IMPLS and device.type != "cuda":
        raise ValueError(f"{impl} needs a CUDA device")
    dt = DTYPES[dtype]
    if impl == "convs-only":
        return _convs_only_step(shape, dt, mode, device, seed)
    eager, layer = make_models(shape, device, dt, seed)
    model = layer if impl in LAYER_IMPLS else eager
    _configure(layer, impl)
    if impl in COMPILED_IMPLS or impl in ("layer-compiled-ro", "layer-compiled"):
        model = torch.compile(model, mode="reduce-overhead" if impl.endswith("-ro") else None)
    seq_of = _sequence_of(impl, model)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    size = shape.x_size()
    x = torch.randn(size, generator=gen).to(device, dt)
    # cudagraph trees reuse their output memory: tell them where one step ends.
    mark = torch.compiler.cudagraph_mark_step_begin if impl.endswith("-ro") else (lambda: None)

    if mode == "fwd":

        def fwd_step():
            mark()
            with torch.no_grad():
                seq_of(x)

        return fwd_step

    x.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    target = torch.randn(size[:2] + (shape.out_channels,) + size[3:],
                         generator=gen).to(device, dt)

    def train_step():
        mark()
        loss = F.mse_loss(seq_of(x), target)
        torch.autograd.grad(loss, params + [x])

    return train_step


def _convs_only_step(shape: Shape, dt, mode: str, device: torch.device, seed: int):
    """The convolutions the layer cannot avoid, and nothing else: the floor it is compared to.

    Per direction (two when bidirectional), fwd: one input conv over all T frames at once plus
    T hidden convs. train adds T hidden input-gradient convs (the recurrence forces one per
    step) and batched calls for dx, dW_x and dW_h. Channels-last where the dims have one (2-d,
    3-d), bias-free, all in one CUDA graph on GPU (plain calls on CPU).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, t, k, hid = shape.batch, shape.steps, shape.kernel, shape.hidden
    n = shape.dims
    fmt = {2: torch.channels_last, 3: torch.channels_last_3d}.get(n, torch.contiguous_format)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]

    def rand(*size):
        return torch.randn(size, generator=gen).to(device, dt).contiguous(memory_format=fmt)

    # Time-major frames so that step t's slice [t*b:(t+1)*b] is one contiguous block.
    directions = []
    for _ in range(2 if shape.bidirectional else 1):
        directions.append((
            rand(t * b, shape.in_dim, *shape.spatial), rand(t * b, hid, *shape.spatial),
            rand(t * b, 4 * hid, *shape.spatial),
            rand(4 * hid, shape.in_dim, *[k] * n), rand(4 * hid, hid, *[k] * n),
        ))
    pad, one, zero = [k // 2] * n, [1] * n, [0] * n
    grad = torch.ops.aten.convolution_backward

    def body():
        for x_all, h_all, dz_all, w_x, w_h in directions:
            conv(x_all, w_x, padding=pad)
            for s in range(t):
                conv(h_all[s * b : (s + 1) * b], w_h, padding=pad)
            if mode == "train":
                for s in range(t):
                    sl = slice(s * b, (s + 1) * b)
                    grad(dz_all[sl], h_all[sl], w_h, None, one, pad, one, False, zero, 1,
                         [True, False, False])
                grad(dz_all, x_all, w_x, None, one, pad, one, False, zero, 1,
                     [True, True, False])
                grad(dz_all, h_all, w_h, None, one, pad, one, False, zero, 1,
                     [False, True, False])

    return graphed(body, device)


def graphed(body: Callable[[], None], device: torch.device) -> Callable[[], None]:
    """On CUDA, ``body`` captured in one graph (its replay is what gets timed); else ``body``,
    run once here all the same, so that a body that cannot run fails in this call anywhere.

    Args:
        body: the work to time, a function of no arguments; on CUDA it must be capturable.
        device: CUDA captures (after two warm-up runs on a side stream); anything else does not.

    Returns:
        The graph's replay on CUDA, else ``body`` itself.
    """
    if device.type != "cuda":
        body()
        return body
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream picks the cuDNN algorithms
        body()
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


@dataclass
class Timing:
    """What :func:`time_step` measured.

    Args:
        median_ms: median time of one call, ms.
        min_ms: fastest call, ms.
        reps: timed calls.
        times_ms: every timed call, ms, in call order.
    """

    median_ms: float
    min_ms: float
    reps: int
    times_ms: list[float]


def time_step(
    step: Callable[[], None],
    device: torch.device,
    reps: int = 10,
    warmup: int = 2,
    target_s: float | None = None,
    max_reps: int = 200,
) -> Timing:
    """Median time of ``step`` over ``reps`` calls after ``warmup`` calls.

    On CUDA each call sits between two CUDA events (a launch-bound step shows its CPU time, as
    it should); with ``target_s`` the number of calls is raised to fill about that many seconds.
    On CPU, time.perf_counter around each call.

    Args:
        step: the work to time, a function of no arguments.
        device: picks the timer (CUDA events on CUDA, perf_counter elsewhere).
        reps: timed calls (at least, with ``target_s``).
        warmup: untimed calls first.
        target_s: CUDA only: seconds the timed calls should fill about (one more untimed call
            measures a step); None keeps ``reps``.
        max_reps: the most calls ``target_s`` may raise ``reps`` to.

    Returns:
        The :class:`Timing` of the timed calls.
    """
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if target_s is not None:
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            once = max(time.perf_counter() - t0, 1e-6)
            reps = max(reps, min(max_reps, int(target_s / once)))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), len(times), times)


def interleaved(
    steps: dict[str, Callable[[], None]], device: torch.device, rounds: int = 5, reps: int = 5
) -> dict[str, list[float]]:
    """Per-round median times (ms) of several steps, run in turns (order reversed every other
    round) so that a noisy neighbour or a clock change hits all of them alike. Steps must be
    warmed up (compiled, captured) already.

    Args:
        steps: name -> step (a function of no arguments).
        device: picks the timer, as in :func:`time_step`.
        rounds: turns over all steps.
        reps: timed calls of a step per round (after one untimed call).

    Returns:
        name -> its ``rounds`` per-round median times, ms, in round order.
    """
    names = list(steps)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else reversed(names):
            out[n].append(time_step(steps[n], device, reps=reps, warmup=1).median_ms)
    return out


def ratio_of(fast: list[float], slow: list[float]) -> float:
    """Median over rounds of slow/fast: the speedup of ``fast`` measured round by round.

    Args:
        fast: per-round times of one step (as from :func:`interleaved`).
        slow: the other step's times in the same rounds.

    Returns:
        The median of the per-round ratios slow / fast.
    """
    return statistics.median(s / f for f, s in zip(fast, slow))


def peak_memory_mb(step: Callable[[], None], device: torch.device, base: int) -> float:
    """Peak memory during one call of a warmed-up step, in MiB.

    CUDA: torch.cuda.max_memory_allocated above ``base`` (what was allocated before the case was
    built). So it counts weights and inputs (alike for all implementations) and what an
    implementation holds between calls (CUDA-graph pools, saved workspaces), which a baseline
    taken just before the call would hide.

    CPU: the most bytes of tensors created during the call alive at once, from
    :class:`~.memory.TensorMemoryTracker` (``base`` is unused): activations, what autograd
    saves, gradients; not weights, inputs, kernel workspaces, nor RSS. Exact and
    repeatable, comparable between implementations on CPU, not with the CUDA numbers. Not for
    torch.compile'd steps on CPU: Dynamo runs the uncompiled code under the tracker.

    Args:
        step: the warmed-up step, a function of no arguments; called once.
        device: picks the measure (above).
        base: CUDA: bytes allocated before the case was built; unused elsewhere.

    Returns:
        The peak in MiB.
    """
    if device.type != "cuda":
        gc.collect()  # the collector then runs at the same points of every call: repeatable
        with TensorMemoryTracker() as tracker:
            step()
        return tracker.peak_bytes / 2**20
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def release(device: torch.device) -> None:
    """Drop what a finished case left behind (compiled graphs, CUDA-graph pools, cached blocks).

    Args:
        device: on CUDA, the allocator's cached blocks are emptied too.
    """
    from ... import graphs

    torch._dynamo.reset()
    graphs.clear()  # inference entries are shared by signature, not owned by a module
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device``, so that a host clock read after it sees it done.

    Args:
        device: a CUDA device is synchronized; others need nothing.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    impl: str, shape: Shape, dtype: str, mode: str, device: torch.device,
    reps: int = 5, target_s: float | None = None,
) -> dict:
    """Build, warm up and time one case; a row for the results table. Failures (out of memory,
    a compile error) become a row with ``error`` set instead of ending the run.

    Args:
        impl: one of IMPLS.
        shape: the case's sizes.
        dtype: a key of DTYPES.
        mode: "fwd" or "train".
        device: where it runs; the step is built as by :func:`build_step` (seed 0).
        reps: timed calls (at least), as for :func:`time_step`.
        target_s: CUDA: seconds the timed calls should fill about, as for :func:`time_step`.

    Returns:
        The row: impl, shape (name), steps, dtype, mode, device (type); median_ms, min_ms and
        reps; peak_mem_mb (:func:`peak_memory_mb`; None for compiled impls on CPU) and
        peak_reserved_mb (CUDA only); first_call_s (the untimed first call); error ("Type:
        first line of the message", or None). Measures not taken stay None (reps 0 when
        the timing did not run).
    """
    row = {"impl": impl, "shape": shape.name, "steps": shape.steps, "dtype": dtype, "mode": mode,
           "device": device.type, "median_ms": None, "min_ms": None, "reps": 0,
           "peak_mem_mb": None, "peak_reserved_mb": None, "first_call_s": None, "error": None}
    try:
        # A fresh dynamo cache per case: the recompile limit (8) would otherwise make later
        # shapes and dtypes fall back to eager without a word.
        torch._dynamo.reset()
        cuda = device.type == "cuda"
        base = torch.cuda.memory_allocated(device) if cuda else 0
        base_reserved = torch.cuda.memory_reserved(device) if cuda else 0
        step = build_step(impl, shape, dtype, mode, device)
        t0 = time.perf_counter()
        step()  # compiles / captures / autotunes: reported apart, never timed with the rest
        sync(device)
        row["first_call_s"] = round(time.perf_counter() - t0, 3)
        timing = time_step(step, device, reps=reps, warmup=2, target_s=target_s)
        row.update(median_ms=timing.median_ms, min_ms=timing.min_ms, reps=timing.reps)
        if cuda or impl not in COMPILED_IMPLS:  # see peak_memory_mb
            row["peak_mem_mb"] = peak_memory_mb(step, device, base)
        if cuda:
            # What the allocator holds from the driver at the step's peak: the allocated bytes
            # plus CUDA-graph private pools (a capture's freed temporaries stay reserved for
            # its replays) and cache slack: the footprint that decides an out-of-memory.
            reserved = torch.cuda.max_memory_reserved(device) - base_reserved
            row["peak_reserved_mb"] = round(reserved / 2**20, 1)
    except Exception as exc:  # one broken case must not cost the whole table
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        step = None
        release(device)
    return row


def compile_seconds(impl: str, shape: Shape, dtype: str, device: torch.device) -> float:
    """Seconds of the first training step of ``torch.compile(model, fullgraph=True)``: tracing,
    compiling forward and backward, and one run.

    Args:
        impl: "eager" (the formulation, whose time loop the compiler unrolls) or "layer".
        shape: the sizes; x is (batch, steps, in_dim, *spatial).
        dtype: a key of DTYPES.
        device: where it runs.

    Returns:
        The wall-clock seconds of that first step.

    Raises:
        Exception: whatever compiling raises (e.g. a graph break under fullgraph=True).
    """
    eager, layer = make_models(shape, device, DTYPES[dtype])
    model = layer if impl in LAYER_IMPLS else eager
    _configure(layer, impl)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(shape.x_size(), device=device, dtype=DTYPES[dtype], requires_grad=True)
    try:
        sync(device)
        t0 = time.perf_counter()
        _sequence_of(impl, compiled)(x).float().square().mean().backward()
        sync(device)
        return time.perf_counter() - t0
    finally:
        del compiled, model, eager, layer
        release(device)
