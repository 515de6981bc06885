"""Perf-regression suite: ``pytest bench/test_perf.py --benchmark-json=NEW.json``.

Two kinds of test:

* ``test_cpu_step``: pytest-benchmark cases (the layer and the eager formulation, forward and
  training step, small CPU shapes: 2-d, and the family's 1-d, 3-d and bidirectional ones).
  Compare two runs with ``python -m triton_convlstm bench compare OLD.json NEW.json``. The
  eager cases are the control: when they move as much as the layer's, the machine changed, not
  the code.
* ``test_cpu_train_memory``: the layer's peak training memory over the eager formulation's, on
  CPU, counted exactly by triton_convlstm.apps.bench.memory (no timing, so no noise).
* gates: same-run speed ratios, the layer against a baseline measured in the same process,
  in interleaved rounds (median of per-round ratios), so a slow or busy machine slows both sides.
  A CPU ratio below its gate is measured once more, over twice the rounds, and that decides.
  CPU: the layer's training step against the eager formulation (written the popular way for
  the shape's n; bidirectional as two passes). GPU (marked ``gpu``): the fast-path
  goals against the best of torch.compile's default and reduce-overhead modes.

No wall-clock or byte thresholds anywhere: only ratios.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from triton_convlstm.apps.bench.cases import (
    CPU_SHAPES,
    FAMILY_CPU_SHAPES,
    GPU_SHAPES,
    MODES,
    SHAPES,
    build_step,
    interleaved,
    peak_memory_mb,
    ratio_of,
    release,
)
from triton_convlstm.apps.bench.gate_step import GATE_STEP_IMPLS, build_gate_step
from triton_convlstm.apps.bench.streaming import STREAM_SIZES, build_stream_step

CPU = torch.device("cpu")

# Goal (issue 4): the layer's CPU training step >= 1.3x the eager formulation's. Measured (2-core
# shared box, 1 thread, interleaved): 0.89-1.04x before the in-place gate math, 1.00x / 0.98x
# after it; 2026-11-28 session 2: cpu-s 0.99-1.12x, cpu-m 1.11-1.19x; session 4: cpu-s
# 1.04-1.17x, cpu-m 1.13-1.34x (noisy). Not reliably met, and not for lack
# of batching: both do the same convolution FLOPs (oneDNN runs them near one core's peak; the
# layer's channels_last batches are ~25% cheaper), and the same sigmoid/tanh work, which bounds
# the gate math. The gate sits a margin below what is measured, to catch regressions without
# flaking. Session 9 (the CPU gate kernels, csrc/gates.c): cpu-s 1.35-1.37x, cpu-m 1.24-1.39x.
# Session 10 (native_step's one-call steps): cpu-s 1.41x, cpu-m 1.28-1.31x. Session 13 (3x3
# convolutions, their input and weight gradients by Winograd F(2x2, 3x3)), three runs: cpu-s
# 1.64-1.67x, cpu-m 1.56-1.57x.
CPU_TRAIN_GATE = 1.25

# The rest of the family against the formulation written the popular way for its n (2026-12-06,
# 2-core shared box, 1 thread, this gate's loop; `pytest bench/test_perf.py -k train_gate -s`
# 5 times plus 5 runs of the same loop in a script): cpu-1d 0.92-0.97x, cpu-3d 0.91-0.96x,
# cpu-s-bi 1.03-1.10x (one 0.88x with a busy neighbour). The layer does not beat eager at
# these 1-d and 3-d sizes on CPU (its forward alone is 0.7-0.8x there): the gates only catch
# regressions, a margin below the lowest seen, so as not to flake. Session 9 (the CPU gate
# kernels), two runs: cpu-1d 1.24-1.27x, cpu-3d 1.05-1.07x, cpu-s-bi 1.37-1.38x. Session 10
# (native_conv: small 1-d/3-d convolutions as C columns and products; native_step: each small
# step one C call), final two runs: cpu-1d 1.61-1.64x, cpu-3d 1.27-1.29x, cpu-s-bi 1.42x.
# Session 11 (native_conv's input gradient: one columns buffer, per-chunk work made once),
# two runs: cpu-1d 1.53-1.54x, cpu-3d 1.33-1.35x, cpu-s-bi 1.39-1.44x.
# Session 12: cpu-hid8 (B1 T16 C1 hid8 64x64) 1.22-1.33x (before the session's fixes: 0.63x
# at B4 C4 hid8 32x32, the gate update's rows of 8 channels then scalar code). Session 13
# (Winograd; 1-d and 3-d unchanged), three runs: cpu-1d 1.56-1.68x, cpu-3d 1.30-1.39x,
# cpu-s-bi 1.55-1.74x, cpu-hid8 1.46-1.52x. Session 15 (input gradients in one C call,
# tcl_input_grad), three runs: cpu-1d 1.71-1.77x, cpu-3d 1.59-1.82x.
CPU_TRAIN_GATES = {
    **{shape: CPU_TRAIN_GATE for shape in CPU_SHAPES},
    "cpu-1d": 1.4, "cpu-3d": 1.3, "cpu-s-bi": 1.25, "cpu-hid8": 1.2,
}

# Goal (issue 18): a variable-length batch costs at most 5% more than the same batch padded, run
# without lengths (same run, training step, lengths from T down to T/2: cases.mixed_lengths).
# The masking is in the gate update: on CPU two multiplies per step past some sample's end, plus
# per call the padding zeroed, a (T, B) table and the last steps gathered (~60 small ops, a few
# microseconds each at these sizes). Measured (2026-12-06, 2-core shared box, 1 thread, this
# test, 9 runs): cpu-s 0.79-0.94x, cpu-s-bi 0.87-1.03x (one 0.73x with a busy neighbour): the
# goal is not reliably met at these tiny shapes, where dispatch dominates. The gate catches a
# regression (a per-step host read, an extra pass over the state) without flaking. Session 9
# (the CPU gate kernels), two runs: cpu-s 0.92-0.94x, cpu-s-bi 0.92-0.93x.
LENGTHS_GATE = 0.75

# Issue 17: on CPU the layer is never slower than the popular module. Inference (the forward
# under no_grad) against the eager formulation at the suite's shapes and the two
# (CPU_INFER_GATES), one frame at a time against the popular cell (CPU_STREAM_GATES), and the
# model under torch.compile against itself eager and the compiled formulation
# (CPU_COMPILED_GATES). Goals: >= 1.0x everywhere (>= 1.2x inference at the suite's shapes);
# the gates sit ~20% below the lowest ratio measured, which is not always the goal: measured
# 2026-12-06 (2-core shared box, one thread, these tests, two runs):
# inference cpu-s 0.93-0.99x, cpu-m 1.27-1.34x, cpu-1d 0.78-0.81x, cpu-3d 0.73-0.76x,
# cpu-s-bi 1.01x, cpu-inf-deep 0.89-1.11x, cpu-inf-wide 1.02-1.21x; one frame at a time against the
# popular cell: the cell 0.71-0.79x (hid16 16x16) and 0.96-1.01x (hid64 64x64), the layer on
# T=1 chunks 0.46-0.50x and 1.09-1.18x; compiled (training, cpu-s) 0.72-0.95x the layer eager
# and 0.79x the compiled formulation. Session 8 (quick_step.py for one frame; the CPU gate
# math's tanh dense below 32 hidden), same box, two runs: inference cpu-s 1.06-1.07x, cpu-m
# 1.12-1.16x, cpu-1d 0.84x, cpu-3d 0.91-0.93x, cpu-s-bi 1.05-1.09x, cpu-inf-deep 1.11-1.24x,
# cpu-inf-wide 0.98-1.04x; one frame at a time: the cell 0.88-0.92x (stream-s) and
# 1.01-1.04x (stream-m), the layer 0.74-0.81x and 1.20-1.21x. Session 9 (the CPU gate kernels,
# csrc/gates.c), two runs: inference cpu-s 1.27x, cpu-m 1.25-1.28x, cpu-1d 1.04-1.10x, cpu-3d
# 1.02-1.04x, cpu-s-bi 1.21-1.27x, cpu-inf-deep 1.31-1.35x, cpu-inf-wide 1.02-1.05x; one frame
# at a time the cell 0.99-1.00x (stream-s) and 1.05-1.08x (stream-m), the layer 0.81-0.84x and
# 1.30-1.35x; compiled training cpu-s 0.92-0.94x the layer eager, 0.95-0.97x the compiled
# formulation. Session 10 (native_conv for 1-d/3-d; native_step: each small step, the loops'
# and the one-frame call's, in one C call), final runs: inference cpu-s 1.53-1.84x, cpu-m
# 1.20-1.21x, cpu-1d 2.00-2.18x, cpu-3d 1.80-2.00x, cpu-s-bi 1.56-1.87x, cpu-inf-deep
# 1.25-1.31x, cpu-inf-wide 1.08-1.11x; one frame at a time the cell 1.25-1.31x (stream-s) and
# 1.08-1.11x (stream-m), the layer 1.07-1.10x and 1.36-1.39x; compiled training cpu-s
# 0.92-1.02x the layer eager, 0.92-1.11x the compiled formulation. Session 11 (the compiled
# backward overwrites the saved gates, gate_buffer.py), two runs: inference cpu-s 1.48-1.52x,
# cpu-m 1.23-1.24x, cpu-1d 1.97-2.01x, cpu-3d 1.51-1.52x (session 10's final commit measured
# 1.49-1.56x beside it: the box, not the code; its gate 1.45 -> 1.2), cpu-s-bi 1.52-1.56x,
# cpu-inf-deep 1.37-1.39x, cpu-inf-wide 1.08-1.09x; the cell 1.17-1.30x and 1.09x, the layer
# 1.05-1.08x and 1.32-1.38x; compiled training cpu-s 0.92-0.94x the layer eager (0.95-1.01x
# at T=64, where it was 0.95-0.96x), 1.00-1.04x the compiled formulation.
# docs/PERF_NOTES.md says where the rest goes.
# Session 12 (the gate kernels' short rows vectorized; the concatenation in the frames' layout):
# cpu-hid8 0.92-1.00x in this test, 1.10x in an A/B script (0.34x at B4 C4 hid8 32x32 before):
# near parity, where oneDNN's convolutions and torch's vectorized pointwise ops are as quick
# as ours; the gate catches the regression it was.
# Session 13 (3x3 convolutions by Winograd F(2x2, 3x3), native_winograd.py: 2.25x fewer
# multiplies than oneDNN's direct convolution, which had run near the core's peak), three runs
# on a box whose speed moved ~1.5x between them: inference cpu-s 2.13-2.20x, cpu-m
# 1.87-2.25x, cpu-1d 2.36-2.57x, cpu-3d 1.61-2.01x, cpu-s-bi 2.04-2.12x, cpu-inf-deep
# 1.78-2.41x, cpu-inf-wide 1.60-2.05x, cpu-hid8 1.05-1.32x; one frame at a time the cell
# 1.18-1.21x (stream-s) and 1.55-1.62x (stream-m), the layer 0.97-1.07x and 1.97-2.14x;
# compiled cpu-s 1.16-1.27x the compiled formulation, 0.81-0.95x itself eager (the fixed
# cost per call against a step that got faster), the demo model 0.85-1.09x.
CPU_INFER_GATES = {
    "cpu-s": 1.7, "cpu-m": 1.5, "cpu-1d": 1.6, "cpu-3d": 1.2, "cpu-s-bi": 1.65,
    "cpu-inf-deep": 1.4, "cpu-inf-wide": 1.3, "cpu-hid8": 0.85,
}
CPU_STREAM_GATES = {("cell", "stream-s"): 1.0, ("cell", "stream-m"): 1.2,
                    ("layer", "stream-s"): 0.85, ("layer", "stream-m"): 1.55}
CPU_COMPILED_GATES = {"layer": 0.7, "compiled": 0.75}  # (layer: 0.81x seen, session 13)
# The same goal for a whole model: the demo's encoder-forecaster (apps/demo/nowcast_model.py:
# four layers, B4, 10 frames in and 10 out on 16x16 grids, a 1x1 head, BCE), its training step
# compiled against itself eager. Measured (2026-12-06, 2-core box, one thread): this test
# 0.96-1.03x over three runs, a script of the same loop 1.02-1.03x; the one-layer cpu-s case
# above is 0.92-0.94x (the compiled wrappers' fixed cost per call against a 5 ms step).
# Session 13: 0.85-1.09x over three runs (the low one on a box ~1.5x slower throughout).
CPU_COMPILED_MODEL_GATE = 0.8

# The CPU gate kernels (csrc/gates.c, session 9) against the same update in torch ops
# (reference.py), one training step's forward and backward at the per-step sizes of cpu-s and
# cpu-m (B, hidden, side; channels-last). Measured (2026-12-06, 2-core shared box, one thread,
# two runs): cpu-s 2.22-2.81x, cpu-m 2.05-2.08x. Session 12, hidden sizes whose rows are no
# whole 16-float vector (before: scalar code, 52 ns a cell at hid 8), packed into dense pieces
# (csrc/gates.c), two runs: hid 8 1.94-1.97x, hid 12 1.69-1.76x, hid 4 1.50-1.51x. The gates
# sit ~20% below the lowest seen.
GATE_STEP_SIZES = {"cpu-s": (2, 16, 16), "cpu-m": (4, 32, 24), "hid4": (4, 4, 32),
                   "hid8": (4, 8, 32), "hid12": (2, 12, 32)}
CPU_GATE_KERNEL_GATES = {"cpu-s": 1.6, "cpu-m": 1.6, "hid4": 1.2, "hid8": 1.5, "hid12": 1.35}

# Issue 17's goals hold on two threads as well (training >= 1.3x, inference >= 1.0x). The
# layer's threads are torch's own OpenMP workers (csrc/parallel.c); session 13's Python pool
# had waited for the cores those workers spin on after each torch op (then: cpu-m training
# 1.22-1.25x, inference 1.26-1.38x, cpu-hid8 inference 1.07-1.13x). Measured (2026-12-06,
# session 14, 2-core shared box, this test, three runs): cpu-m training 1.74-1.86x,
# inference 2.09-2.19x, cpu-hid8 inference 1.22-1.25x. cpu-3d had gained nothing from the
# second core (training 1.04-1.22x on two threads, 1.64-1.85x on one: its columns steps and
# input gradients ran on one thread); session 15 shares both (tcl_step_forward's tiles,
# tcl_input_grad's pieces), three runs: training 1.43-1.69x, inference 1.84-1.93x. The gates
# sit ~20% below.
CPU_TWO_THREAD_GATES = {("cpu-m", "train"): 1.45, ("cpu-m", "fwd"): 1.7, ("cpu-hid8", "fwd"): 1.0,
                        ("cpu-3d", "train"): 1.15, ("cpu-3d", "fwd"): 1.45}

# Goal: the layer's peak training memory <= 0.5x the eager formulation's. Measured with
# TensorMemoryTracker (fp32, tensors created during one step, layer / eager): at fcdefaf cpu-s
# 3.35 / 2.56 MiB = 1.31x, cpu-m 29.71 / 23.06 MiB = 1.29x. Since the saved gates live in the
# input convolution's output and the backward overwrites them with their gradients: cpu-s
# 0.96x, cpu-m 0.95x, cpu-deep (3 layers) 0.84x; since 1ed8529 (two allocations a step fewer in
# the CPU gate backward) 0.93x, 0.92x, 0.84x. With recompute_gates=True (only h and c saved):
# 0.80x, 0.78x and 0.46x: the goal is met where saved activations add up, i.e. in deep models;
# session 15 (and its base commit eaea526 alike): 0.97x, 0.96x, 0.84x; recompute 0.83x, 0.78x,
# 0.46x;
# one layer's peak is mostly its output, the output's gradient, h and c, which eager holds too.
# Exact and repeatable: the gates sit just above what is measured.
CPU_TRAIN_MEMORY_GATES = {
    ("layer", "cpu-s"): 1.0, ("layer", "cpu-m"): 1.0, ("layer", "cpu-deep"): 0.9,
    ("layer-recompute", "cpu-s"): 0.86, ("layer-recompute", "cpu-m"): 0.85,
    ("layer-recompute", "cpu-deep"): 0.5,
}

# The fast-path goals on CUDA: layer speedup over the best torch.compile of the formulation.
GPU_GOALS = {
    ("train", "S"): 2.0, ("train", "M"): 2.0, ("train", "L"): 1.7,
    ("fwd", "S"): 1.3, ("fwd", "M"): 1.3, ("fwd", "L"): 1.05,
}


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread():
    # On a shared 2-core box, two OpenMP threads wait on each other whenever a neighbour takes a
    # core (tiny convolutions went from 0.3 ms to 30 ms): one thread gives steady numbers.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _release():
    yield
    release(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _gate_message(case: str, fast: str, slow: str, times: dict, ratio: float, gate: float):
    return (f"{case}: {fast} {statistics.median(times[fast]):.3f} ms vs {slow} "
            f"{statistics.median(times[slow]):.3f} ms = {ratio:.2f}x, below the gate {gate}x")


def _warm(steps: dict, calls: int = 3) -> None:
    for step in steps.values():
        for _ in range(calls):  # compile, capture, record cudagraph trees: all before timing
            step()


@pytest.mark.parametrize("impl", ["layer", "eager"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CPU_SHAPES + FAMILY_CPU_SHAPES)
def test_cpu_step(benchmark, shape, mode, impl):
    step = build_step(impl, SHAPES[shape], "fp32", mode, CPU)
    benchmark.extra_info.update(shape=SHAPES[shape].label, impl=impl, mode=mode)
    benchmark.pedantic(step, rounds=8, warmup_rounds=2, iterations=1)


def _cpu_ratio_gate(case: str, steps: dict, fast: str, slow: str, gate: float,
                    record_property, rounds: int = 7, reps: int = 3, warm: int = 2,
                    per: float = 1.0, unit: str = "ms") -> None:
    """Time ``steps`` interleaved on CPU, record and print slow/fast (fast's speedup), and
    assert it is at least ``gate``. ``per`` divides the printed times (per frame, say).

    A ratio below the gate is measured once more, over twice the rounds, and that second
    measurement decides: on a shared box a neighbour can take the core for a few rounds of
    one side (CI once failed a gate by 0.3%), while a regression shows in both."""
    _warm(steps, warm)
    for attempt, n in enumerate((rounds, 2 * rounds)):
        times = interleaved(steps, CPU, rounds=n, reps=reps)
        ratio = ratio_of(times[fast], times[slow])
        print(f"{case}: {fast} {statistics.median(times[fast]) / per:.2f} {unit}, {slow} "
              f"{statistics.median(times[slow]) / per:.2f} {unit}, {ratio:.2f}x"
              + (" (second measurement)" if attempt else ""))
        if ratio >= gate:
            break
    record_property(f"{fast}_over_{slow}", round(ratio, 3))
    assert ratio >= gate, _gate_message(case, fast, slow, times, ratio, gate)


def _cpu_steps(impls, shape: str, mode: str) -> dict:
    return {i: build_step(i, SHAPES[shape], "fp32", mode, CPU) for i in impls}


@pytest.mark.parametrize("shape", list(CPU_TRAIN_GATES))
def test_cpu_train_gate(shape, record_property):
    _cpu_ratio_gate(f"cpu train {shape}", _cpu_steps(("layer", "eager"), shape, "train"),
                    "layer", "eager", CPU_TRAIN_GATES[shape], record_property)


@pytest.mark.parametrize("shape", sorted(CPU_INFER_GATES))
def test_cpu_infer_gate(shape, record_property):
    big = shape.startswith("cpu-inf")  # a forward takes a fraction of a second there
    _cpu_ratio_gate(f"cpu fwd {shape}", _cpu_steps(("layer", "eager"), shape, "fwd"),
                    "layer", "eager", CPU_INFER_GATES[shape], record_property,
                    rounds=3 if big else 7, reps=1 if big else 3)


@pytest.mark.parametrize(("impl", "size"), sorted(CPU_STREAM_GATES))
def test_cpu_stream_gate(impl, size, record_property):
    hidden, side = STREAM_SIZES[size]
    frames = 20 if size == "stream-s" else 4
    steps = {i: build_stream_step(i, hidden, side, CPU, frames) for i in (impl, "popular-cell")}
    _cpu_ratio_gate(f"cpu stream {size}", steps, impl, "popular-cell",
                    CPU_STREAM_GATES[(impl, size)], record_property, per=frames / 1e3,
                    unit="us a frame")


@pytest.mark.parametrize(("shape", "mode"), sorted(CPU_TWO_THREAD_GATES))
def test_cpu_two_threads_gate(shape, mode, record_property):
    """The layer against the formulation with torch on two threads (the suite's others: one)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    torch.set_num_threads(2)
    try:
        _cpu_ratio_gate(f"cpu {mode} {shape} two threads",
                        _cpu_steps(("layer", "eager"), shape, mode), "layer", "eager",
                        CPU_TWO_THREAD_GATES[(shape, mode)], record_property)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("baseline", sorted(CPU_COMPILED_GATES))
def test_cpu_compiled_gate(baseline, record_property):
    """The layer compiled (torch.compile's default mode, training step) against the layer
    eager ("layer") and the formulation compiled ("compiled"), at steady state."""
    torch._dynamo.reset()
    _cpu_ratio_gate("cpu train cpu-s compiled",
                    _cpu_steps(("layer-compiled", baseline), "cpu-s", "train"),
                    "layer-compiled", baseline, CPU_COMPILED_GATES[baseline], record_property,
                    warm=3)


def _nowcast_steps() -> dict:
    """The demo model's training step, eager and compiled (torch.compile's default mode)."""
    import torch.nn.functional as F

    from triton_convlstm.apps.demo.nowcast_model import NowcastModel

    torch.manual_seed(0)
    model = NowcastModel(hidden=16, num_layers=2, out_frames=10)
    gen = torch.Generator().manual_seed(1)
    x, target = (torch.rand(4, 10, 1, 32, 32, generator=gen) for _ in range(2))
    params = list(model.parameters())

    def step_of(run):
        def step():
            torch.autograd.grad(F.binary_cross_entropy(run(x), target), params)
        return step

    return {"eager": step_of(model), "compiled": step_of(torch.compile(model))}


def test_cpu_compiled_model_gate(record_property):
    """A whole model under torch.compile against itself eager, at steady state."""
    torch._dynamo.reset()
    _cpu_ratio_gate("cpu train nowcast compiled", _nowcast_steps(), "compiled", "eager",
                    CPU_COMPILED_MODEL_GATE, record_property, rounds=5, reps=2, warm=3)


@pytest.mark.parametrize("shape", ["cpu-s", "cpu-s-bi"])
def test_cpu_lengths_gate(shape, record_property):
    _cpu_ratio_gate(f"cpu train lengths {shape}",
                    _cpu_steps(("layer-lengths", "layer"), shape, "train"),
                    "layer-lengths", "layer", LENGTHS_GATE, record_property)


@pytest.mark.parametrize("size", sorted(CPU_GATE_KERNEL_GATES))
def test_cpu_gate_kernels_gate(size, record_property):
    batch, hidden, side = GATE_STEP_SIZES[size]
    steps = {i: build_gate_step(i, batch, hidden, side) for i in GATE_STEP_IMPLS}
    _cpu_ratio_gate(f"cpu gate update {size}", steps, "native", "torch-ops",
                    CPU_GATE_KERNEL_GATES[size], record_property, rounds=7, reps=20, unit="ms")


@pytest.mark.parametrize(("impl", "shape"), sorted(CPU_TRAIN_MEMORY_GATES))
def test_cpu_train_memory(impl, shape, record_property):
    steps = {i: build_step(i, SHAPES[shape], "fp32", "train", CPU) for i in (impl, "eager")}
    _warm(steps, 2)
    peaks = {i: peak_memory_mb(step, CPU, 0) for i, step in steps.items()}
    ratio = peaks[impl] / peaks["eager"]
    gate = CPU_TRAIN_MEMORY_GATES[(impl, shape)]
    record_property(f"{impl}_over_eager_train_peak_memory", round(ratio, 3))
    print(f"cpu train memory {shape}: {impl} {peaks[impl]:.2f} MiB, eager "
          f"{peaks['eager']:.2f} MiB, {ratio:.2f}x")
    assert ratio <= gate, (
        f"cpu train memory {shape}: {impl} {peaks[impl]:.2f} MiB vs eager "
        f"{peaks['eager']:.2f} MiB = {ratio:.2f}x, above the gate {gate}x")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["train", "fwd"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_goal(benchmark, shape, dtype, mode):
    dev = torch.device("cuda")
    torch._dynamo.reset()
    impls = ("layer", "compiled", "compiled-ro")
    steps = {i: build_step(i, SHAPES[shape], dtype, mode, dev) for i in impls}
    _warm(steps)
    times = interleaved(steps, dev, rounds=5, reps=10)
    best = min(("compiled", "compiled-ro"), key=lambda i: statistics.median(times[i]))
    ratio = ratio_of(times["layer"], times[best])
    benchmark.extra_info.update(
        shape=SHAPES[shape].label, dtype=dtype, mode=mode, best_compile=best,
        speedup_vs_best_compile=round(ratio, 3),
        **{f"{i}_ms": round(statistics.median(times[i]), 4) for i in impls})

    def synced_layer_step():  # pytest-benchmark reads the CPU clock: wait for the GPU's work
        steps["layer"]()
        torch.cuda.synchronize()

    benchmark.pedantic(synced_layer_step, rounds=10, warmup_rounds=1, iterations=1)
    goal = GPU_GOALS[(mode, shape)]
    print(f"gpu {mode} {shape} {dtype}: layer "
          f"{statistics.median(times['layer']):.3f} ms, {best} "
          f"{statistics.median(times[best]):.3f} ms, {ratio:.2f}x (goal {goal}x)", flush=True)
    assert ratio >= goal, _gate_message(
        f"gpu {mode} {shape} {dtype}", "layer", best, times, ratio, goal)
