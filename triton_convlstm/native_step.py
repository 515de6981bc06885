"""A whole ConvLSTM step in inference on CPU in one C call (``csrc/step.c``): the columns of
[x, h], their product with the weight by the BLAS sgemm torch links, the bias and the gate
update, for small frames (the streaming use: one frame at a time, state carried).

There a step is a handful of torch ops of a few microseconds of dispatch each around ~50 us of
arithmetic; torch's own 2-d convolution at batch 1 builds its columns in ~20 us. Measured in
docs/PERF_NOTES.md (session 10).

:func:`step_forward` answers None, having written nothing, where it does not serve the call
(no library or no sgemm, another dtype or device, autograd or a tracer must see the step,
frames past native_conv's limits, a state the gate plan cannot read); the caller then runs
the convolution and the gate update as before, which compute the same function (to float
rounding: another summation order, polynomial activations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .native_build import Layout, Plan, Rows, StepPlan
from .native_conv import MAX_COLUMN_FLOATS, MAX_PIXELS, _geometry, _pixel_stride
from .native_gates import _library, _vector

_F32 = torch.float32
_PLAIN = (Tensor, torch.nn.Parameter)
_PLANS: dict = {}  # sizes and strides -> StepPlan, or None where not served


def _dense_rows(t: Tensor) -> bool:
    """Each row (dim 0) of t dense, unit stride last: the weight as an (out, rows) matrix at
    its row stride (a channel slice of a weight qualifies)."""
    step = 1
    for size, st in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size > 1 and st != step:
            return False
        step *= size
    return True


def _make_plan(x: Tensor, h: Tensor | None, c: Tensor, weight: Tensor,
               dilation: Sequence[int]) -> StepPlan | None:
    b, cx, *spatial = x.shape
    hid = c.shape[1]
    channels = cx + (0 if h is None else h.shape[1])
    kernel = tuple(weight.shape[2:])
    pixels, rows = math.prod(spatial), channels * math.prod(kernel)
    if (not 1 <= len(spatial) <= 3 or len(kernel) != len(spatial) or b == 0 or pixels == 0
            or pixels > MAX_PIXELS or rows * pixels > MAX_COLUMN_FLOATS
            or tuple(weight.shape) != (4 * hid, channels, *kernel)
            or tuple(c.shape) != (b, hid, *spatial)
            or (h is not None and tuple(h.shape) != (b, hid, *spatial))
            or not _dense_rows(weight) or not rows <= weight.stride(0) < 2**31
            or min(dilation) < 1):
        return None  # (rows closer than a row apart overlap: an expanded weight, say)
    px, pc = _pixel_stride(x), _pixel_stride(c)
    ph = None if h is None else _pixel_stride(h)
    if px is None or pc != 1 or (h is not None and ph is None):
        return None
    out = 4 * hid
    gates = Plan(B=b, m_begin=0, m_end=hid, N=pixels, hid=hid, peep_on_n=0)
    gates.gate_step[0] = hid * pixels
    gates.rows[0] = Rows(out * pixels, pixels)  # z in the scratch
    gates.rows[1] = Rows(c.stride(0), c.stride(1))
    gates.rows[2] = gates.rows[3] = Rows(hid * pixels, pixels)  # the new c and h, dense
    return StepPlan(
        g=_geometry(b, spatial, kernel, dilation), x=Layout(cx, x.stride(0), x.stride(1), px),
        h=Layout(0, 0, 0, 1) if h is None else Layout(h.shape[1], h.stride(0), h.stride(1),
                                                      ph),
        cols=Layout(rows, rows * pixels, pixels, 1), gates=gates, rows=rows, out=out,
        pixels=pixels, w_row=weight.stride(0))


def step_forward(x: Tensor, h: Tensor | None, c: Tensor, weight: Tensor, bias: Tensor | None,
                 peephole: Tensor | None,
                 dilation: Sequence[int]) -> tuple[Tensor, Tensor] | None:
    """``step_op.cell_step``'s (h, c) in one C call, zeros padding, or None where not served.

    Args:
        x: (B, C, *spatial) fp32, 1 to 3 spatial dims, any layout.
        h: (B, hidden, *spatial) fp32 or None (the zero state: the weight has x's channels).
        c: (B, hidden, *spatial) fp32, channels-first pixels (the state the cell keeps).
        weight: (4*hidden, C + hidden, *k) fp32 (C without h), each output row dense.
        bias: (4*hidden,) or None.
        peephole: (3, hidden) or None.
        dilation: one int per spatial dim.

    Returns:
        (h, c), each (B, hidden, *spatial) contiguous fp32, or None.
    """
    lib = _library()
    if lib is None or not lib.has_sgemm:
        return None
    for t in (x, h, c, weight, bias, peephole):
        if t is not None and (type(t) not in _PLAIN or t.dtype != _F32 or not t.is_cpu):
            return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, h, c, weight, bias, peephole)):
        return None
    key = (x.shape, x.stride(), None if h is None else (h.shape, h.stride()), c.shape,
           c.stride(), weight.shape, weight.stride(), tuple(dilation))
    plan = _PLANS.get(key, False)
    if plan is False:
        plan = _make_plan(x, h, c, weight, dilation)
        if len(_PLANS) > 1024:
            _PLANS.clear()
        _PLANS[key] = plan
    if plan is None:
        return None
    hid = c.shape[1]
    if (peephole is not None and peephole.shape != (3, hid)) or (
            bias is not None and (bias.shape != (4 * hid,) or bias.stride(0) != 1)):
        return None
    peephole = _vector(peephole)  # (held until the call returns)
    h_new, c_new = torch.empty(c.shape, dtype=_F32), torch.empty(c.shape, dtype=_F32)
    if lib.tcl_step_forward(plan, x.data_ptr(), None if h is None else h.data_ptr(),
                            weight.data_ptr(), None if bias is None else bias.data_ptr(),
                            c.data_ptr(), None if peephole is None else peephole.data_ptr(),
                            c_new.data_ptr(), h_new.data_ptr()):
        return None
    return h_new, c_new

