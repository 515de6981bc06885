"""The one-frame inference call on CPU (the cell's step, the layer's T=1 call): a whole step
in one C call (native_step's), into new contiguous h and c, the state the cell keeps
(channels-first). Large frames convolve by native_winograd on channels-last copies of the
state; the rest by the columns.

:func:`step_forward` answers None, having written nothing, where it does not serve the call;
the caller then runs the convolution and the gate update as separate calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import native_build, native_step
from .native_conv import plain_fp32
from .native_gates import _library, memoised
from .native_step import _key, _make_plan, _run, _winograd_channels, winograd

_F32 = torch.float32
_PLANS: dict = {}  # sizes and strides -> the columns' plan, or ("winograd", ...) -> a decision
_MAX_PLANS = 1024


def step_forward(x: Tensor, h: Tensor | None, c: Tensor, weight: Tensor, bias: Tensor | None,
                 peephole: Tensor | None,
                 dilation: Sequence[int]) -> tuple[Tensor, Tensor] | None:
    """``native_step.step_into`` into new contiguous h and c (the one-frame path: the cell,
    the layer's T=1 call), or None where not served. Its own shorter plan key: the streaming
    step's Python is a visible part of a ~70 us step.

    Args:
        x, h, weight, bias, peephole, dilation: as ``native_step.step_into``'s.
        c: (B, hidden, *spatial) fp32, channels-first pixels (the state the cell keeps).

    Returns:
        (h, c), each (B, hidden, *spatial) contiguous fp32, or None.
    """
    lib = _library()  # (first: nothing below for a tracer to see)
    if lib is None or not lib.has_sgemm or not plain_fp32((x, h, c, weight, bias, peephole)):
        return None
    key = (_key(x), _key(h), _key(c), _key(weight), tuple(dilation), native_build.threads())
    if memoised(_PLANS, ("winograd", key), lambda: _winograd_sized(x, weight, dilation),
                _MAX_PLANS):
        done = _winograd_step_forward(lib, x, h, c, weight, bias, peephole, dilation)
        if done is not None:
            return done

    def make():
        new = torch.empty(c.shape, device="meta")
        return _make_plan(x, h, c, new, new, None, weight, dilation, False)

    plan = memoised(_PLANS, key, make, _MAX_PLANS)
    if plan is None:
        return None
    h_new, c_new = torch.empty(c.shape, dtype=_F32), torch.empty(c.shape, dtype=_F32)
    if not _run(lib, plan, x, h, c, weight, bias, peephole, c_new, h_new, None, None):
        return None
    return h_new, c_new


# The one-frame call convolves by native_winograd from this many multiply-adds a step (the
# direct sum's count); below, the columns. Its state is channels-first (the cell's, which
# users hold) while winograd.c writes channels-last z, so h and c are copied into that layout
# and back: four copies of the state a step. Measured (one thread, 10 frames, against the
# popular cell; columns, then Winograd): hid16 16x16 (2.5M) 1.12x, 0.83x; hid24 24x24 (12M)
# 1.05x, 1.01x; hid32 32x32 (39M) 1.04x, 1.61x; hid64 64x64 (613M) 1.10x, 1.42x (the layer
# on T=1 chunks 1.21x, 1.93x).
WINOGRAD_FORWARD_MACS = 1 << 24


def _winograd_sized(x: Tensor, weight: Tensor, dilation: Sequence[int]) -> bool:
    """Whether the one-frame call of these sizes tries native_winograd (2-d, served, at least
    WINOGRAD_FORWARD_MACS; its threads are asked per call)."""
    b, _, *spatial = x.shape
    return (len(spatial) == 2 and winograd(weight, dilation, spatial, True)
            and 9 * b * math.prod(spatial) * weight.shape[0] * weight.shape[1]
            >= WINOGRAD_FORWARD_MACS)


def _winograd_step_forward(lib, x: Tensor, h: Tensor | None, c: Tensor, weight: Tensor,
                           bias: Tensor | None, peephole: Tensor | None,
                           dilation: Sequence[int]) -> tuple[Tensor, Tensor] | None:
    """:func:`step_forward` by ``native_step.step_into``'s Winograd step on channels-last
    copies of h and c, or None (nothing allocated past the checks) where that does not
    serve."""
    b, _, *spatial = x.shape
    h_last = None if h is None else _channels_last(h)
    if not _winograd_channels(lib, weight, dilation, x, h_last, True):
        return None
    c_last = _channels_last(c, copy=True)  # (updated in place)
    h_new = torch.empty(b, *spatial, c.shape[1], dtype=_F32).movedim(-1, 1)
    if not native_step.step_into(x, h_last, c_last, weight, bias, peephole, dilation, h_out=h_new,
                     c_out=c_last, pixel_major=True):
        return None
    return h_new.contiguous(), c_last.contiguous()


def _channels_last(t: Tensor, copy: bool = False) -> Tensor:
    """t with dense channels: itself where it has them (unless ``copy``), else a copy."""
    if t.stride(1) == 1 and not copy:
        return t
    b, ch, *spatial = t.shape
    return torch.empty(b, *spatial, ch, dtype=t.dtype).movedim(-1, 1).copy_(t)
