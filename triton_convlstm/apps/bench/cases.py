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
    """``layers`` layers (one unless said), kernel 3: x is (batch, steps, in_dim, size, size),
    hidden channels ``hidden`` in every layer.

    Args:
        name: the key in SHAPES, and the shape's name in result rows.
        batch: B.
        steps: sequence length T.
        in_dim: input channels C.
        hidden: hidden channels of every layer.
        size: H = W.
        kernel: kernel side.
        layers: stacked ConvLSTM layers.
    """

    name: str
    batch: int
    steps: int
    in_dim: int
    hidden: int
    size: int
    kernel: int = 3
    layers: int = 1

    def with_steps(self, steps: int) -> Shape:
        """This shape with another sequence length (the T sweep).

        Args:
            steps: the new T.

        Returns:
            A copy with ``steps`` replaced; the name stays.
        """
        return replace(self, steps=steps)

    @property
    def label(self) -> str:
        """The sizes as text, e.g. ``B4-T16-C8-H32-32x32`` (``-L3`` appended for 3 layers)."""
        deep = f"-L{self.layers}" if self.layers > 1 else ""
        return (f"B{self.batch}-T{self.steps}-C{self.in_dim}-H{self.hidden}-{self.size}x{self.size}"
                f"{deep}")


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
    )
}
GPU_SHAPES = ("S", "M", "L")
CPU_SHAPES = ("cpu-s", "cpu-m")
# "layer-nographs": the layer with its CUDA-graph replay off (what the graphs buy, per shape);
# "layer-recompute": with recompute_gates=True (what the memory it saves costs in time);
# "layer-fused": one Triton kernel per forward step (LayerSpec.fused; on CPU the same as layer);
# "layer-fused-nographs": that without graphs (a profile then sees each kernel);
# "layer-compiled-ro": the layer under torch.compile(mode="reduce-overhead"), its own graphs off:
# cudagraph trees capture the op, the loss and the backward around it, which a user can do too.
LAYER_IMPLS = ("layer", "layer-nographs", "layer-recompute", "layer-fused",
               "layer-fused-nographs", "layer-compiled-ro")
IMPLS = ("eager", "compiled", "compiled-ro", *LAYER_IMPLS, "convs-only")
COMPILED_IMPLS = ("compiled", "compiled-ro")  # the formulation compiled: the goals' baselines
CUDA_ONLY_IMPLS = ("compiled-ro", "layer-compiled-ro")  # reduce-overhead means CUDA graphs
MODES = ("fwd", "train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _layer_class():
    # Imported late: the bench command's argument checks and `compare` need no layer at all.
    from ...modules import ConvLSTM

    return ConvLSTM


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
        :class:`triton_convlstm.ConvLSTM`.
    """
    torch.manual_seed(seed)
    eager = EagerConvLSTM(shape.in_dim, shape.hidden, shape.kernel, shape.layers)
    layer = _layer_class()(shape.in_dim, shape.hidden, shape.kernel, shape.layers,
                           batch_first=True)
    layer.load_state_dict(eager.state_dict())
    return eager.to(device, dtype), layer.to(device, dtype)


def _configure(layer, impl: str) -> None:
    """The layer's switches for a LAYER_IMPLS name (the others get the plain layer)."""
    switches = set(impl.split("-")[1:]) if impl in LAYER_IMPLS else set()
    layer.cuda_graphs = not switches & {"nographs", "compiled"}
    layer.recompute_gates = "recompute" in switches
    layer.fused_forward = "fused" in switches


def _sequence_of(impl: str, model) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the (B, T, hidden, H, W) output sequence, whichever output convention ``model`` has."""
    if impl in LAYER_IMPLS:

        def run(x):
            outs, _ = model(x)
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
        shape: the case's sizes; x is (batch, steps, in_dim, size, size).
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
    if impl in COMPILED_IMPLS or impl == "layer-compiled-ro":
        model = torch.compile(model, mode="reduce-overhead" if impl.endswith("-ro") else None)
    seq_of = _sequence_of(impl, model)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    size = (shape.batch, shape.steps, shape.in_dim, shape.size, shape.size)
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
    target = torch.randn(size[:2] + (shape.hidden,) + size[3:], generator=gen).to(device, dt)

    def train_step():
        mark()
        loss = F.mse_loss(seq_of(x), target)
        torch.autograd.grad(loss, params + [x])

    return train_step


def _convs_only_step(shape: Shape, dt, mode: str, device: torch.device, seed: int):
    """The convolutions the layer cannot avoid, and nothing else: the floor it is compared to.

    fwd: one input conv over all T frames at once plus T hidden convs. train adds T hidden
    input-gradient convs (the recurrence forces one per step) and batched calls for dx, dW_x
    and dW_h. channels_last, bias-free, all in one CUDA graph on GPU (plain calls on CPU).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, t, k, hid = shape.batch, shape.steps, shape.kernel, shape.hidden
    fmt = torch.channels_last

    def rand(*size):
        return torch.randn(size, generator=gen).to(device, dt).contiguous(memory_format=fmt)

    # Time-major frames so that step t's slice [t*b:(t+1)*b] is one contiguous block.
    x_all = rand(t * b, shape.in_dim, shape.size, shape.size)
    h_all = rand(t * b, hid, shape.size, shape.size)
    dz_all = rand(t * b, 4 * hid, shape.size, shape.size)
    w_x, w_h = rand(4 * hid, shape.in_dim, k, k), rand(4 * hid, hid, k, k)
    pad, one = [k // 2] * 2, [1, 1]
    grad = torch.ops.aten.convolution_backward

    def body():
        F.conv2d(x_all, w_x, padding=pad)
        for s in range(t):
            F.conv2d(h_all[s * b : (s + 1) * b], w_h, padding=pad)
        if mode == "train":
            for s in range(t):
                sl = slice(s * b, (s + 1) * b)
                grad(dz_all[sl], h_all[sl], w_h, None, one, pad, one, False, [0, 0], 1,
                     [True, False, False])
            grad(dz_all, x_all, w_x, None, one, pad, one, False, [0, 0], 1, [True, True, False])
            grad(dz_all, h_all, w_h, None, one, pad, one, False, [0, 0], 1, [False, True, False])

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
        shape: the sizes; x is (batch, steps, in_dim, size, size).
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
    size = (shape.batch, shape.steps, shape.in_dim, shape.size, shape.size)
    x = torch.randn(size, device=device, dtype=DTYPES[dtype], requires_grad=True)
    try:
        sync(device)
        t0 = time.perf_counter()
        _sequence_of(impl, compiled)(x).float().square().mean().backward()
        sync(device)
        return time.perf_counter() - t0
    finally:
        del compiled, model, eager, layer
        release(device)
