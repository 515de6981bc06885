"""A whole ConvLSTM step in inference on CPU in one C call (``csrc/step.c``): the convolution
of [x, h] (its columns and their product with the weight by the BLAS sgemm torch links, or
for 3x3 kernels native_winograd's), the bias and the gate update; for the time loops
(:func:`steps_into`, :func:`step_into`) and the one-frame call (native_frame).

There a step is a handful of torch ops of a few microseconds of dispatch each around ~50 us of
arithmetic; torch's own 2-d convolution at batch 1 builds its columns in ~20 us. Measured in
docs/PERF_NOTES.md (sessions 10 and 13). On several threads, Winograd steps share their
tiles between threads (:func:`_shared_steps`).

:func:`step_into` answers False and :func:`steps_into` 0, having written nothing, where they
do not serve the call (no library or no sgemm, another dtype or device, autograd or a tracer
must see the step, frames past native_conv's limits, a state the gate plan cannot read); the
caller then runs the convolution and the gate update as before, which compute the same
function (to float rounding: another summation order, polynomial activations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import native_build, native_gates, native_winograd
from .native_build import StepPlan
from .native_conv import (
    _NO_LAYOUT,
    MAX_COLUMN_FLOATS,
    MAX_PIXELS,
    _geometry,
    _layout,
    _pixel_stride,
    padded_copy_floats,
    plain_fp32,
)
from .native_gates import _library, _make_plans, _ptr, _vector, memoised

_F32 = torch.float32
_PLANS: dict = {}  # sizes and strides -> (StepPlan, scratch floats), or None where not served
_MAX_PLANS = 1024
# 2-d frames of a batch above one: torch's convolution is oneDNN's, channels-last, which beats
# the columns past about this many column floats a sample. Measured (one thread, a step, C +
# hidden channels, side): B2 4+16 16x16 (46K) 148 vs 179 us; B2 8+32 16x16 (92K) 438 vs 439;
# B2 4+16 24x24 (104K) 5% slower; B4 8+32 24x24 (207K) and B2 4+16 32x32 (184K) 25-30%
# slower. At batch 1 torch's 2-d convolution is itself columns and a product: B1 1+16 32x32
# (157K) 285 vs 317 us. 1-d and 3-d frames have only native_conv's columns to compare with.
MAX_2D_BATCHED_COLUMN_FLOATS = 1 << 16
# The columns are built a tile of output rows at a time, at most this many floats (256 KiB) or
# one row: the step's scratch (a training step's peak counts it) stays small. Measured (one
# thread, one run each, layer / formulation): cpu-3d (B1 C2+8 8x8x8, 138K column floats)
# training peak 1.46 -> 1.12x with the speed unchanged within noise (training 1.35 -> 1.47x,
# inference 1.90 -> 2.01x); 64 KiB tiles cost speed (1.29x, 1.76x); cpu-s (one tile) as before.
TILE_FLOATS = 1 << 16
# On several threads, a columns step's tiles are shared (each thread its own tile of columns)
# from this many multiply-adds a thread (the step's product, a sample).
COLUMN_THREAD_MACS = 1 << 20


def _dense_rows(t: Tensor) -> bool:
    """Each row (dim 0) of t dense, unit stride last: the weight as an (out, rows) matrix at
    its row stride (a channel slice of a weight qualifies)."""
    step = 1
    for size, st in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size > 1 and st != step:
            return False
        step *= size
    return True


def winograd(weight: Tensor, dilation: Sequence[int], spatial: Sequence[int],
             pixel_major: bool) -> bool:
    """Whether steps of this layer convolve by native_winograd (channels-last 2-d frames,
    3x3, enough channels): the weight handed to the step is then its transform."""
    return pixel_major and native_winograd.fits(spatial, weight.shape[2:], dilation,
                                                weight.shape[1], weight.shape[0])


def _make_plan(x: Tensor, h: Tensor | None, c_prev: Tensor, c_out: Tensor, h_out: Tensor,
               gates: Tensor | None, weight: Tensor, dilation: Sequence[int],
               pixel_major: bool, u_channels: int = 0) -> tuple[StepPlan, int] | None:
    """The step's plan and its scratch's size in floats, or None where not served.
    ``u_channels``: the step convolves by native_winograd with a transform of this many
    channels (the whole layer's, also for the zero state's x alone), else 0: the columns."""
    b, cx, *spatial = x.shape
    hid = c_prev.shape[1]
    channels = cx + (0 if h is None else h.shape[1])
    kernel = tuple(weight.shape[2:])
    pixels, rows, out = math.prod(spatial), channels * math.prod(kernel), 4 * hid
    columns = not u_channels  # (the columns' limits: winograd.c's scratch is a block's)
    # Threads sharing a columns step's tiles (output rows of W pixels), each its own tile: the
    # columns' limits below are a thread's (on two threads, 7x7 at B1 C1+8 32x32, past one
    # thread's: inference 0.88 -> 1.09x, training 1.36 -> 1.47x; 5x5 at B1 C4+16 32x16 1.59
    # -> 1.73x; the rest as before).
    shares = 1 if not (columns and spatial and pixels) else max(1, min(
        native_build.threads(), pixels // spatial[-1],
        out * rows * pixels // COLUMN_THREAD_MACS))
    if (not 1 <= len(spatial) <= 3 or len(kernel) != len(spatial) or b == 0 or rows == 0
            or pixels == 0
            or (columns and (pixels > MAX_PIXELS or rows * pixels > MAX_COLUMN_FLOATS * shares))
            or (columns and len(spatial) == 2 and b > 1
                and rows * pixels > MAX_2D_BATCHED_COLUMN_FLOATS * shares)
            or tuple(weight.shape) != (4 * hid, channels, *kernel)
            or (h is not None and tuple(h.shape) != (b, hid, *spatial))
            or not _dense_rows(weight) or not rows <= weight.stride(0) < 2**31
            or len(dilation) != len(spatial) or min(dilation) < 1):
        return None  # (rows closer than a row apart overlap: an expanded weight, say)
    px = _pixel_stride(x)
    ph = None if h is None else _pixel_stride(h)
    if px is None or (h is not None and ph is None):
        return None
    # z as the scratch holds it, for the gate plan: (B, out, pixels), or pixel-major.
    z_shape = (b, out, *spatial)
    if pixel_major:
        z = torch.empty(b, *spatial, out, device="meta").movedim(-1, 1)
    else:
        z = torch.empty(z_shape, device="meta")
    if gates is not None and (gates.shape != z.shape or any(
            size > 1 and st != want for size, st, want in zip(z.shape, gates.stride(),
                                                               z.stride()))):
        return None  # (strides of size-1 dims never move an address)
    # One plan, no thread split: the step is one call (its product may use torch's threads).
    plans = _make_plans((z, c_prev, c_out, h_out), 0, (2, 3), threads=1)
    if plans is None:
        return None
    geometry = _geometry(b, spatial, kernel, dilation)
    lx, lh = _layout(x, px), _NO_LAYOUT if h is None else _layout(h, ph)
    z_floats = 0 if gates is not None else b * out * pixels
    if not columns:
        if not (pixel_major
                and native_winograd.fits(spatial, kernel, dilation, u_channels, out)):
            return None
        wino = native_winograd.make_plan(b, spatial, lx, lh, out, u_channels, pixels * out,
                                         out)
        scratch = native_winograd.scratch_floats(_library(), wino) + z_floats
        return StepPlan(g=geometry, x=lx, h=lh, gates=plans[0], out=out, pixels=pixels,
                        z_pixel_major=1, z_in_gates=int(gates is not None), winograd=1,
                        wino=wino), scratch
    width = geometry.W
    n_rows = pixels // width
    tile_rows = max(1, min(n_rows, TILE_FLOATS // (rows * width)))
    if shares > 1:  # (as many tiles for each thread)
        tiles = -(-n_rows // tile_rows)
        tile_rows = -(-n_rows // (-(-tiles // shares) * shares))
    padded = padded_copy_floats(channels, spatial, kernel, dilation)
    if padded > MAX_COLUMN_FLOATS:
        return None  # (a large dilation's padded copy: zeroed every step, bigger than the work)
    scratch = padded + shares * rows * tile_rows * width + z_floats
    plan = StepPlan(
        g=geometry, x=lx, h=lh, gates=plans[0], rows=rows, out=out,
        pixels=pixels, w_row=weight.stride(0), z_pixel_major=int(pixel_major),
        tile_rows=tile_rows, z_in_gates=int(gates is not None), threads=shares,
        gate_threads=len(native_gates._split(b * pixels * hid, plans[0].m_end, shares)))
    return plan, scratch


def _key(t: Tensor | None):
    return None if t is None else (t.shape, t.stride())


def _vectors_fit(peephole: Tensor | None, bias: Tensor | None, hid: int) -> bool:
    """A (3, hid) peephole and a dense (4*hid,) bias, or None: what the C step indexes."""
    return ((peephole is None or peephole.shape == (3, hid))
            and (bias is None or (bias.shape == (4 * hid,) and bias.stride(0) == 1)))


def _small_inputs_fit(peephole: Tensor | None, bias: Tensor | None, valid: Tensor | None,
                      c_prev: Tensor) -> bool:
    """:func:`_vectors_fit`, and a multiplier of one value per sample or None."""
    return (_vectors_fit(peephole, bias, c_prev.shape[1])
            and (valid is None or valid.numel() == c_prev.shape[0]))


def _run(lib, found: tuple[StepPlan, int], x: Tensor, h: Tensor | None, c_prev: Tensor,
         weight: Tensor, bias: Tensor | None, peephole: Tensor | None, c_out: Tensor,
         h_out: Tensor, gates: Tensor | None, valid: Tensor | None) -> bool:
    """The C call, after the small vectors' checks; whether it ran."""
    plan, scratch_floats = found
    if not _small_inputs_fit(peephole, bias, valid, c_prev):
        return False
    # (the converted copies held until the call returns)
    peephole, valid = _vector(peephole), _vector(valid)
    scratch = torch.empty(scratch_floats, dtype=_F32)
    return not lib.tcl_step_forward(
        plan, x.data_ptr(), _ptr(h), weight.data_ptr(), _ptr(bias), c_prev.data_ptr(),
        _ptr(peephole), c_out.data_ptr(), h_out.data_ptr(), _ptr(gates), _ptr(valid),
        scratch.data_ptr())


def step_into(x: Tensor, h: Tensor | None, c_prev: Tensor, weight: Tensor, bias: Tensor | None,
              peephole: Tensor | None, dilation: Sequence[int], *, h_out: Tensor,
              c_out: Tensor, gates: Tensor | None = None, valid: Tensor | None = None,
              pixel_major: bool = False) -> bool:
    """``step_op.cell_step``'s step (zeros padding) written into the given tensors, in one C
    call; False, having written nothing, where not served.

    Args:
        x: (B, C, *spatial) fp32, 1 to 3 spatial dims, any layout with one pixel stride.
        h: (B, hidden, *spatial) fp32, likewise, or None (the zero state: the weight has x's
            channels alone).
        c_prev: (B, hidden, *spatial) fp32.
        weight: (4*hidden, C + hidden, *k) fp32 (C without h), each output row dense.
        bias: (4*hidden,) or None.
        peephole: (3, hidden) or None.
        dilation: one int per spatial dim.
        h_out, c_out: like c_prev, written (c_out may be c_prev: updated in place). The gate
            plan's row view must fit c_prev, c_out and h_out with z's (see pixel_major).
        gates: where the activated gates go (the training loop saves them), laid out as z, or
            None.
        valid: (B, ...) per-sample step multipliers (reference.step_valid), or None.
        pixel_major: z channels-last (the loops' 2-d and 1-d frames), else channels-first.

    Returns:
        True when done.
    """
    lib = _library()
    if (lib is None or not lib.has_sgemm
            or not plain_fp32((x, h, c_prev, weight, bias, peephole, h_out, c_out, gates,
                               valid))):
        return False
    u_channels = _winograd_channels(lib, weight, dilation, x, h, pixel_major)
    plan = _plan_for(x, h, c_prev, c_out, h_out, gates, weight, dilation, pixel_major,
                     u_channels)
    if plan is None:
        return False
    if u_channels:
        weight = native_winograd.transform_weight(weight)
        if torch.get_num_threads() > 1:
            parts = _shared_parts(lib, x, h, 4 * c_prev.shape[1], u_channels)
            if not _small_inputs_fit(peephole, bias, valid, c_prev):
                return False
            z = _pixel_major_z(c_prev) if gates is None else gates
            scratch = torch.empty(len(parts[0]) * parts[1], dtype=_F32)
            _shared_step(lib, parts, scratch, x, h, weight, bias, c_prev, peephole, c_out,
                         h_out, z, gates, valid)
            return True
    return _run(lib, plan, x, h, c_prev, weight, bias, peephole, c_out, h_out, gates, valid)


def _shared_parts(lib, x: Tensor, h: Tensor | None, out: int, u_channels: int,
                  threads: int | None = None) -> tuple[list, int] | None:
    """native_winograd.split_plan's plans for the step's convolution on ``threads`` (default
    torch's) and each one's scratch floats, memoised: None where too few threads would be
    busy (torch's convolution serves)."""
    threads = torch.get_num_threads() if threads is None else threads

    def make():
        b, _, *spatial = x.shape
        px, ph = _pixel_stride(x), None if h is None else _pixel_stride(h)
        if px is None or (h is not None and ph is None):
            return None
        lh = _NO_LAYOUT if h is None else _layout(h, ph)
        pixels = math.prod(spatial)
        plan = native_winograd.make_plan(b, spatial, _layout(x, px), lh, out, u_channels,
                                         pixels * out, out)
        return native_winograd.split_plan(lib, plan, threads)

    return memoised(_PLANS, ("shared", _key(x), _key(h), out, u_channels, threads), make,
                    _MAX_PLANS)


def _winograd_channels(lib, weight: Tensor, dilation: Sequence[int], x: Tensor,
                       h: Tensor | None, pixel_major: bool) -> int:
    """The u_channels of :func:`_make_plan` for these steps: the weight's channels where
    native_winograd serves them (on several threads, only where they share the tiles:
    :func:`_shared_parts`), else 0 (the columns)."""
    if not winograd(weight, dilation, x.shape[2:], pixel_major):
        return 0
    if torch.get_num_threads() > 1 and _shared_parts(lib, x, h, weight.shape[0],
                                                     weight.shape[1]) is None:
        return 0
    return weight.shape[1]


def _pixel_major_z(c: Tensor) -> Tensor:
    """An uninitialised (B, 4*hidden, *spatial) fp32 z, channels dense (winograd.c's)."""
    b, hid, *spatial = c.shape
    return torch.empty(b, *spatial, 4 * hid, dtype=_F32).movedim(-1, 1)


def _shared_step(lib, parts, scratch: Tensor, x: Tensor, h: Tensor | None, u: Tensor,
                 bias: Tensor | None, c_prev: Tensor, peephole: Tensor | None, c_out: Tensor,
                 h_out: Tensor, z: Tensor, gates: Tensor | None, valid: Tensor | None) -> None:
    """A step whose convolution threads share (a share of the tiles each), then the gate
    update on native_gates' threads (a share of the rows each): z is the pre-activations'
    buffer (gates itself where given)."""
    native_winograd.run(lib, *parts, scratch, x.data_ptr(), _ptr(h), u.data_ptr(), _ptr(bias),
                        z.data_ptr())
    native_gates.gate_forward(z, gates, c_prev, peephole, h_out, c_out, valid)


def _plan_for(x, h, c_prev, c_out, h_out, gates, weight, dilation, pixel_major, u_channels):
    """_make_plan's answer for these tensors' sizes and strides, memoised."""
    key = (_key(x), _key(h), _key(c_prev), _key(c_out), _key(h_out), _key(gates),
           _key(weight), tuple(dilation), pixel_major, u_channels, native_build.threads())
    return memoised(_PLANS, key, lambda: _make_plan(x, h, c_prev, c_out, h_out, gates, weight,
                                                    dilation, pixel_major, u_channels),
                    _MAX_PLANS)


def steps_into(x: Tensor, count: int, h0: Tensor | None, c_first: Tensor, weight: Tensor,
               bias: Tensor | None, peephole: Tensor | None, dilation: Sequence[int], *,
               h_seq: Tensor, c_seq: Tensor, c_last: Tensor, z_seq: Tensor | None,
               save: bool, pixel_major: bool) -> int:
    """The time loop's first ``count`` steps (no lengths, no recurrent mask), each one C call
    as :func:`step_into` makes it, with the checks and plan lookups made once: step after step
    the tensors are slices of the same buffers. Per step they had cost ~25 us of Python, ~200
    of cpu-s's 1760 us forward.

    Args:
        x: (T, B, C, *spatial), the sequence, time-major, any strides with one pixel stride
            (a batch-first input's transposed view, say).
        count: the steps to run, from the first.
        h0: (B, hidden, *spatial) or None (the zero state); c_first: the first step's cell.
        weight, bias, peephole, dilation: as :func:`step_into`'s.
        h_seq, c_seq, c_last, z_seq: the loop's outputs (sequence.output_buffers): step i
            writes h_seq[i], its cell to c_seq[i] (with ``save``, but the last step's) or else
            to c_last, and its activated gates to z_seq[i] unless z_seq is None.
        save: c_seq keeps the cells.
        pixel_major: as :func:`step_into`'s.

    Returns:
        How many steps ran: 0 where not served (nothing written); the caller runs the rest.
    """
    lib = _library()
    t, cin = h_seq.shape[0], x.shape[2]
    if (count < 1 or lib is None or not lib.has_sgemm
            or not plain_fp32((x, h0, c_first, weight, bias, peephole, h_seq, c_seq, c_last,
                               z_seq))):
        return 0

    def c_out(i):
        return c_seq[i] if save and i < t - 1 else c_last

    u_channels = _winograd_channels(lib, weight, dilation, x[0], h_seq[0], pixel_major)
    # Steps differ in their tensors' strides at most as the first, the middle ones and the
    # last do (which buffers hold c; the first's h may be h0 or none): a plan for each kind.
    plans, scratch_floats = {}, 0
    for i in (0, 1, t - 1):
        kind = (i == 0, i == t - 1)
        if i >= count or kind in plans:
            continue
        h = h0 if i == 0 else h_seq[i - 1]
        found = _plan_for(x[i], h, c_first if i == 0 else c_out(i - 1),
                          c_out(i), h_seq[i], None if z_seq is None else z_seq[i],
                          weight if h is not None else weight[:, :cin], dilation, pixel_major,
                          u_channels)
        if found is None:
            return 0
        plans[kind] = found[0]
        scratch_floats = max(scratch_floats, found[1])
    if not _vectors_fit(peephole, bias, c_last.shape[1]):
        return 0
    peephole = _vector(peephole)  # (held until the calls return)
    if u_channels:
        weight = native_winograd.transform_weight(weight)  # (held until the calls return)
        if torch.get_num_threads() > 1:
            return _shared_steps(lib, x, count, h0, c_first, weight, u_channels, bias,
                                 peephole, h_seq, c_out, z_seq)
    scratch = torch.empty(scratch_floats, dtype=_F32)
    # Each step's pointers by the buffers' strides (fp32: 4 bytes an element).
    x_at, x_step = x.data_ptr(), 4 * x.stride(0)
    h_at, h_step = h_seq.data_ptr(), 4 * h_seq.stride(0)
    c_at, c_step = c_seq.data_ptr(), 4 * c_seq.stride(0)
    z_at, z_step = (0, 0) if z_seq is None else (z_seq.data_ptr(), 4 * z_seq.stride(0))
    w, bp, pp, sp = weight.data_ptr(), _ptr(bias), _ptr(peephole), scratch.data_ptr()
    last = c_last.data_ptr()
    c_prev = c_first.data_ptr()
    for i in range(count):
        c_new = c_at + i * c_step if save and i < t - 1 else last
        h_prev = _ptr(h0) if i == 0 else h_at + (i - 1) * h_step
        if lib.tcl_step_forward(plans[(i == 0, i == t - 1)], x_at + i * x_step, h_prev, w, bp,
                                c_prev, pp, c_new, h_at + i * h_step,
                                None if z_seq is None else z_at + i * z_step, None, sp):
            return i
        c_prev = c_new
    return count


def _shared_steps(lib, x: Tensor, count: int, h0: Tensor | None, c_first: Tensor, u: Tensor,
                  u_channels: int, bias: Tensor | None, peephole: Tensor | None,
                  h_seq: Tensor, c_out, z_seq: Tensor | None) -> int:
    """steps_into's loop where threads share each step (:func:`_shared_step`); steps_into
    made the one-call plans (so the gate update serves these tensors) and checked the small
    vectors. Returns count."""
    out = 4 * c_first.shape[1]
    steps = []
    for i in range(count):
        h = h0 if i == 0 else h_seq[i - 1]
        parts = _shared_parts(lib, x[i], h, out, u_channels)
        if parts is None:  # the zero state's x alone, too few channels to share: one call
            parts = _shared_parts(lib, x[i], h, out, u_channels, threads=1)
        if parts is None:
            return i
        steps.append(parts)
    scratch = torch.empty(max(len(p[0]) * p[1] for p in steps), dtype=_F32)
    z = _pixel_major_z(c_first) if z_seq is None else None
    c_prev = c_first
    for i, parts in enumerate(steps):
        gates = None if z_seq is None else z_seq[i]
        _shared_step(lib, parts, scratch, x[i], h0 if i == 0 else h_seq[i - 1], u, bias,
                     c_prev, peephole, c_out(i), h_seq[i], z if gates is None else gates,
                     gates, None)
        c_prev = c_out(i)
    return count
