"""Small 1-d and 3-d 'same' convolutions on CPU as matrix products: the columns of the input
built by the C kernel (``csrc/im2col.c``), then ``torch.mm``/``matmul`` (MKL's sgemm); the
input gradient as the product's adjoint added back by col2im, and the weight gradient of
channels-first frames as a product a frame, both in one C call each (``tcl_input_grad``,
``tcl_weight_grad``: a piece of channels at a time, the pieces shared between threads; from
Python the per-piece work had cost as much as the products); the weight gradient of
channels-last frames as one product. Zeros padding, fp32, any dilation, channels-first or
channels-last frames.

Measured (one thread, 2-core box, same run; cat + torch's convolution vs this, forward):
1-d B4 C4+16 L64 83-95 vs 38-44 us; 3-d B1 C2+8 8x8x8 185-192 vs 113-123 us (torch's CPU
3-d convolution builds its columns itself, slowly). 2-d frames keep torch's convolution: at
B1 it already is columns and a product (the same numbers), and channels-last oneDNN beat the
columns at the perf suite's 2-d shapes (B2 C4+16 16x16: 115-124 vs 129-139 us), except for
input gradients into a few channels (GRAD_2D_MAX_CHANNELS), which they serve.

Each function answers None, having computed nothing, where it does not serve the call (no
library, another dtype or device, 2-d frames (but those input gradients), frames past the
size limits, another padding, a tensor autograd or a tracer must see); the caller then runs
torch's convolution, which computes the same function (to float rounding: another summation
order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import native_build
from .native_build import ConvGradPlan, Geometry, Layout
from .native_gates import _library, memoised

_F32 = torch.float32
_PLAIN = (Tensor, torch.nn.Parameter)  # not fake, not a subclass that means more than memory
SERVED_DIMS = (1, 3)  # spatial dims served (2-d: see above, and the next)
# 2-d input gradients into at most this many channels (a first layer's 1 to 4 input channels:
# radar echoes, RGB) are served too: oneDNN's backward-data into so few channels barely
# vectorizes. Per call (one thread): 16 frames 1 channel 64x64 from 32: 3.9 ms against the
# columns' 0.95; 3 channels 32x32 from 64: 2.1 against 1.5. From 8 channels on, oneDNN's was
# as fast or faster (training steps with hid 8's recurrent gradient served: 0.885x). Not for a
# 1x1 kernel, whose backward-data oneDNN runs as one product (B2 C4 hid16 16x16: 0.86x).
GRAD_2D_MAX_CHANNELS = 4
# Columns and their gradients exist a chunk of frames (and, past one frame, of channels) at a
# time, at most this many floats (64 KiB) or one channel of one frame: a training step's peak
# memory counts them (torch's own convolutions keep theirs inside ATen, where a tensor
# tracker does not see them). At cpu-1d (one thread, training, layer / formulation): 256 KiB
# chunks (there the whole batch) 1.16x the peak and 1.79x the speed, 64 KiB chunks 0.99x and
# 1.66x, 16 KiB 0.92x and 1.17x.
CHUNK_FLOATS = 1 << 14
# Per sample, frames of at most this many pixels, and columns of at most this many floats
# (1 MiB, about what stays in a core's L2): past them the copies cost more than the products
# gain, and oneDNN's blocking wins.
MAX_PIXELS = 4096
MAX_COLUMN_FLOATS = 1 << 18
# All the frames of one call (the backward's batched gradients read T * B of them): at most
# this many column floats (64 MiB), more is left to torch's convolution and its own memory.
MAX_CALL_COLUMN_FLOATS = 1 << 24
_GEOMETRY: dict = {}  # (B, spatial, kernel, dilation) -> Geometry
_GRAD_PLANS: dict = {}  # kind, sizes and strides -> (ConvGradPlan, scratch floats) or None
# On several threads, a gradient's pieces (a chunk of channels: of a frame for the input
# gradient, of all frames for the weight gradient) are shared from this many multiply-adds a
# thread.
GRAD_THREAD_MACS = 1 << 20
_NO_LAYOUT = Layout(0, 0, 0, 1)


def _pixel_stride(t: Tensor) -> int | None:
    """The one stride at which t's pixels follow each other (z, y, x order), or None."""
    stride, expected = None, None
    for size, st in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size == 1:
            continue
        if stride is None:
            stride, expected = st, st * size
        elif st != expected:
            return None
        else:
            expected *= size
    return 1 if stride is None else stride


def _layout(t: Tensor, pixel: int) -> Layout:
    return Layout(t.shape[1], t.stride(0), t.stride(1), pixel)


def _geometry(b: int, spatial: Sequence[int], kernel: Sequence[int],
              dilation: Sequence[int]) -> Geometry:
    """tcl_im2col's sizes, memoised (1-d and 2-d as 3-d with unit leading dims)."""
    def make():
        lead = (1,) * (3 - len(spatial))
        d = lead + tuple(dilation)
        total = [di * (ki - 1) for ki, di in zip(lead + tuple(kernel), d)]
        # as conv.same_padding: total // 2 before, the odd pixel at the end
        return Geometry(b, *lead, *spatial, *lead, *kernel, *d, *[t // 2 for t in total],
                        *total)

    return memoised(_GEOMETRY, (b, tuple(spatial), tuple(kernel), tuple(dilation)), make, 1024)


def plain_fp32(tensors: Sequence[Tensor | None]) -> bool:
    """Whether these (None entries aside) are fp32 plain CPU tensors (parameters included)
    that autograd need not see: what the C kernels read. native_step asks it too."""
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.dtype != _F32 or not t.is_cpu):
            return False
    return not (torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in tensors))


def _served(tensors: Sequence[Tensor | None], spatial: Sequence[int], kernel: Sequence[int],
            rows: int, dilation: Sequence[int], frames: int,
            dims: Sequence[int] = SERVED_DIMS) -> bool:
    """:func:`plain_fp32` tensors, frames and columns within the limits, a positive
    dilation, ``dims`` spatial dims."""
    if not plain_fp32(tensors):
        return False
    pixels = math.prod(spatial)
    if not (len(spatial) in dims and len(kernel) == len(spatial) == len(dilation)
            and 0 < pixels <= MAX_PIXELS and 0 < rows and rows * pixels <= MAX_COLUMN_FLOATS
            and frames * rows * pixels <= MAX_CALL_COLUMN_FLOATS and min(dilation) >= 1):
        return False
    return (padded_copy_floats(rows // math.prod(kernel), spatial, kernel, dilation)
            <= MAX_COLUMN_FLOATS)


def padded_copy_floats(channels: int, spatial: Sequence[int], kernel: Sequence[int],
                       dilation: Sequence[int]) -> int:
    """The floats of one sample's zero-padded copy (im2col.c's: channels times its padded
    plane), which the columns and native_step's one-call step both build. Past
    MAX_COLUMN_FLOATS only with a large dilation, where it is mostly zeros to write: both
    decline it."""
    return channels * math.prod(n + d * (k - 1) for n, k, d in zip(spatial, kernel, dilation))


def _empty_frames(b: int, channels: int, spatial: Sequence[int], channels_last: bool) -> Tensor:
    """(b, channels, *spatial) fp32, channels-last or channels-first."""
    if channels_last:
        return torch.empty(b, *spatial, channels, dtype=_F32).movedim(-1, 1)
    return torch.empty(b, channels, *spatial, dtype=_F32)


def _chunks(frames: int, channels: int, per_channel: int) -> tuple[int, int]:
    """(frames, channels) per chunk: CHUNK_FLOATS of columns, each channel of a frame
    ``per_channel`` floats (one channel of one frame at least)."""
    if channels * per_channel <= CHUNK_FLOATS:
        return max(1, min(frames, CHUNK_FLOATS // (channels * per_channel))), channels
    return 1, max(1, CHUNK_FLOATS // per_channel)


def _columns(lib, x: Tensor, h: Tensor | None, kernel: Sequence[int], dilation: Sequence[int],
             pixels_major: bool) -> Tensor | None:
    """The columns of [x, h] (B, rows, pixels), or (B, pixels, rows) in memory where
    ``pixels_major`` (returned as the transposed view); None where a stride does not fit."""
    b, c, *spatial = x.shape
    px, ph = _pixel_stride(x), None if h is None else _pixel_stride(h)
    if px is None or (h is not None and ph is None):
        return None
    rows = (c + (0 if h is None else h.shape[1])) * math.prod(kernel)
    pixels = math.prod(spatial)
    if pixels_major:
        cols = torch.empty(b, pixels, rows, dtype=_F32).transpose(1, 2)
    else:
        cols = torch.empty(b, rows, pixels, dtype=_F32)
    failed = lib.tcl_im2col(
        _geometry(b, spatial, kernel, dilation), _layout(x, px), x.data_ptr(),
        _NO_LAYOUT if h is None else _layout(h, ph), None if h is None else h.data_ptr(),
        _layout(cols, cols.stride(2)), cols.data_ptr())
    return None if failed else cols


def conv_small(x: Tensor, h: Tensor | None, weight: Tensor, bias: Tensor | None,
               dilation: Sequence[int], channels_last: bool) -> Tensor | None:
    """``conv_same(cat([x, h], 1), weight, dilation, bias)`` with zeros padding (x alone where
    h is None and the weight has x's channels), or None where not served.

    Args:
        x: (B, C, *spatial), 1 or 3 spatial dims.
        h: (B, hidden, *spatial) or None.
        weight: (O, C + hidden, *k) (C without h).
        bias: (O,) or None.
        dilation: one int per spatial dim.
        channels_last: the result's layout.

    Returns:
        (B, O, *spatial), or None.
    """
    lib = _library()
    b, c, *spatial = x.shape
    kernel = weight.shape[2:]
    channels = c + (0 if h is None else h.shape[1])
    if (lib is None or not _served((x, h, weight, bias), spatial, kernel,
                                   channels * math.prod(kernel), dilation, b)
            or weight.shape[1] != channels or b == 0
            or (h is not None and h.shape != (b, h.shape[1], *spatial))):
        return None
    o, pixels = weight.shape[0], math.prod(spatial)
    w = weight.reshape(o, -1)
    z = _empty_frames(b, o, spatial, channels_last)
    # (B, pixels, O) or (B, O, pixels): a product per chunk of frames into its slice of z
    zm = z.as_strided((b, pixels, o), (z.stride(0), z.stride(-1), z.stride(1))) if (
        channels_last) else z.view(b, o, pixels)
    step = _chunks(b, channels, math.prod(kernel) * pixels)[0]
    for f0 in range(0, b, step):
        f1 = min(b, f0 + step)
        cols = _columns(lib, x[f0:f1], None if h is None else h[f0:f1], kernel, dilation,
                        pixels_major=False)
        if cols is None:
            return None
        for k in range(f1 - f0):  # (mm: matmul would broadcast into a batched product)
            out = zm[f0 + k]
            if channels_last:
                torch.mm(cols[k].t(), w.t(), out=out)
            else:
                torch.mm(w, cols[k], out=out)
    if bias is not None:
        z += bias.view(1, o, *(1,) * len(spatial))
    return z


def _grad_pixel_stride(grad: Tensor, other: Tensor, shape: Sequence[int], weight: Tensor,
                       dilation: Sequence[int], dims: Sequence[int] = SERVED_DIMS) -> int | None:
    """Both gradients' checks: grad (N, O, *spatial) at one pixel stride (returned), ``other``
    (the weight or the input) and the frames ``shape`` (N, C, *spatial) in ``dims`` dims
    served; else None."""
    n, c, *spatial = shape
    kernel = weight.shape[2:]
    pg = _pixel_stride(grad)
    if (pg is None or n == 0
            or not _served((grad, other), spatial, kernel, c * math.prod(kernel), dilation, n,
                           dims)
            or tuple(grad.shape) != (n, weight.shape[0], *spatial) or weight.shape[1] != c):
        return None
    return pg


def pointwise_input_grad(grad: Tensor, x_shape: Sequence[int], weight: Tensor) -> Tensor | None:
    """The input gradient of a 1x1 (1, 1x1x1) convolution on CPU as one product: dx = W^T g
    at each pixel (torch ops, any dtype), or None where the kernel is larger or the tensors
    are not plain CPU tensors of one dtype. Per step of the backward, oneDNN's backward-data
    of so small a convolution cost ~100 us of overhead for ~10 us of products (one thread,
    same-run ratios against the formulation's training, 1x1 kernels: B2 C4 hid16 16x16 0.98
    -> 1.09x, B4 C8 hid32 32x24 1.07 -> 1.23x; two threads 1.68 -> 1.97x, 1.34 -> 1.52x; the
    weight gradient the same way was no faster than torch's).

    Args:
        grad: (N, O, *spatial), the output's gradient.
        x_shape: (N, C, *spatial).
        weight: (O, C, 1, ...).

    Returns:
        (N, C, *spatial): channels-last where grad's frames are, back to back; else
        channels-first.
    """
    if (any(k != 1 for k in weight.shape[2:]) or grad.dim() < 3 or type(grad) not in _PLAIN
            or type(weight) not in _PLAIN or not (grad.is_cpu and weight.is_cpu)
            or grad.dtype != weight.dtype):
        return None
    n, c, *spatial = x_shape
    o = weight.shape[0]
    w = weight.reshape(o, c)
    rows = grad.movedim(1, -1)
    if grad.stride(1) == 1 and rows.is_contiguous():  # (pixels, channels) back to back
        return (rows.reshape(-1, o) @ w).view(n, *spatial, c).movedim(-1, 1)
    return torch.matmul(w.t(), grad.reshape(n, o, -1)).view(n, c, *spatial)


def conv_input_grad_small(grad: Tensor, x_shape: Sequence[int], weight: Tensor,
                          dilation: Sequence[int], channels_last: bool) -> Tensor | None:
    """``conv.conv_same_input_grad`` with zeros padding, or None where not served.

    Args:
        grad: (N, O, *spatial), the output's gradient, any layout.
        x_shape: (N, C, *spatial).
        weight: (O, C, *k).
        dilation: one int per spatial dim.
        channels_last: the result's layout.

    Returns:
        (N, C, *spatial), or None.
    """
    few = x_shape[1] <= GRAD_2D_MAX_CHANNELS and math.prod(weight.shape[2:]) > 1
    dims = (*SERVED_DIMS, 2) if few else SERVED_DIMS
    if len(x_shape) - 2 not in dims:  # (first: the 2-d loops ask at every step)
        return None
    lib = _library()
    pg = None if lib is None else _grad_pixel_stride(grad, weight, x_shape, weight, dilation,
                                                       dims)
    if pg is None:
        return None
    n, c, *spatial = x_shape
    kernel = weight.shape[2:]
    o, pixels, taps = weight.shape[0], math.prod(spatial), math.prod(kernel)
    dx = _empty_frames(n, c, spatial, channels_last)
    pd = _pixel_stride(dx)
    if _grad_in_c(lib, "input", grad, pg, weight.reshape(o, -1), dx, pd, kernel, dilation):
        return dx  # (else the Python loop below)
    g = grad.as_strided((n, o, pixels), (grad.stride(0), grad.stride(1), pg))
    wt = weight.reshape(o, -1).t()  # (C * taps, O)
    frames, channels = _chunks(n, c, taps * pixels)
    # One columns buffer for every chunk, and each chunk size's geometry and layouts made
    # once: at a chunk a channel (3-d hid8 8x8x8), slicing and wrapping per chunk had cost
    # more than its product and col2im (252 -> 190 us a call, torch's 270; 256 KiB chunks,
    # 149 us, had raised cpu-3d's training peak 1.12 -> 1.60x).
    scratch = torch.empty(frames, channels * taps, pixels, dtype=_F32)
    base, frame_bytes, channel_bytes = dx.data_ptr(), dx.stride(0) * 4, dx.stride(1) * 4
    plans: dict = {}  # (frames, channels) of a chunk -> (columns, their layout, dx's, geometry)
    for c0 in range(0, c, channels):
        c1 = min(c, c0 + channels)
        wc = wt[c0 * taps : c1 * taps]
        for f0 in range(0, n, frames):
            f1 = min(n, f0 + frames)
            size = (f1 - f0, c1 - c0)
            plan = plans.get(size)
            if plan is None:
                cols = scratch[: size[0], : size[1] * taps]
                # (one frame: mm, as matmul's batch of one costs more than the product here)
                plan = plans[size] = (cols[0] if size[0] == 1 else cols,
                                      _layout(cols, cols.stride(2)),
                                      _layout(dx[: size[0], : size[1]], pd),
                                      _geometry(size[0], spatial, kernel, dilation))
            cols, cols_layout, dx_layout, geometry = plan
            if f1 - f0 == 1:
                torch.mm(wc, g[f0], out=cols)
            else:
                torch.matmul(wc, g[f0:f1], out=cols)  # (frames, rows, pixels)
            if lib.tcl_col2im(geometry, cols_layout, cols.data_ptr(), dx_layout,
                              base + f0 * frame_bytes + c0 * channel_bytes):
                return None
    return dx


def _grad_plan(lib, kind: str, grad: Tensor, pg: int, w: Tensor, frames: Tensor, pf: int,
               kernel: Sequence[int], dilation: Sequence[int]):
    """(plan, scratch floats) for ``tcl_input_grad`` or ``tcl_weight_grad`` (``kind``
    "input" or "weight"), memoised, or None where C does not serve: no sgemm, grad with
    neither its channels nor its pixels dense (the BLAS's leading dimension: the stride
    between the dense runs, at least their length), the weight's (dw's) rows not dense or
    overlapping.

    Args:
        grad: (N, O, *spatial), its pixels at ``pg``.
        w: the weight (or dw) as (O, C * taps).
        frames: dx or x, (N, C, *spatial), its pixels at ``pf``.
    """
    n, c, *spatial = frames.shape
    o, pixels = w.shape[0], math.prod(spatial)
    # (rows closer than a row apart overlap, an expanded weight's say: the BLAS refuses them)
    if not lib.has_sgemm or w.stride(1) != 1 or (o > 1 and w.stride(0) < w.shape[1]) or not (
            (pg == 1 and (grad.stride(1) >= pixels or o == 1))
            or (grad.stride(1) == 1 and (pg >= o or pixels == 1))):
        return None
    key = (kind, grad.shape, grad.stride(), pg, w.shape, w.stride(0), frames.stride(),
           tuple(kernel), tuple(dilation), native_build.threads())

    def make():
        taps = math.prod(kernel)
        chunk = _chunks(1, c, taps * pixels)[1]
        pieces = (n if kind == "input" else 1) * -(-c // chunk)  # (dw: a chunk all frames)
        plan = ConvGradPlan(
            g=_geometry(1, spatial, kernel, dilation), frames=n, out=o, pixels=pixels,
            grad_frame=grad.stride(0), grad_channel=grad.stride(1), grad_pixel=pg,
            w_row=w.stride(0), x=_layout(frames, pf), chunk=chunk,
            threads=max(1, min(native_build.threads(), pieces,
                               n * o * c * taps * pixels // GRAD_THREAD_MACS)))
        return plan, plan.threads * int(lib.tcl_conv_grad_scratch(plan))

    return memoised(_GRAD_PLANS, key, make, 1024)


def _grad_in_c(lib, kind: str, grad: Tensor, pg: int, w: Tensor, frames: Tensor, pf: int,
               kernel: Sequence[int], dilation: Sequence[int]) -> bool:
    """``tcl_input_grad`` (``kind`` "input": into dx, ``frames``, from the weight ``w``) or
    ``tcl_weight_grad`` ("weight": into dw, ``w``, from x, ``frames``), arguments as
    :func:`_grad_plan`'s: whether it ran (else nothing was written)."""
    found = _grad_plan(lib, kind, grad, pg, w, frames, pf, kernel, dilation)
    if found is None:
        return False
    scratch = torch.empty(found[1], dtype=_F32)
    if kind == "input":
        return not lib.tcl_input_grad(found[0], w.data_ptr(), grad.data_ptr(),
                                      frames.data_ptr(), scratch.data_ptr())
    return not lib.tcl_weight_grad(found[0], frames.data_ptr(), grad.data_ptr(), w.data_ptr(),
                                   scratch.data_ptr())


def conv_weight_grad_small(grad: Tensor, x: Tensor, weight: Tensor,
                           dilation: Sequence[int]) -> Tensor | None:
    """``conv.conv_same_weight_grad`` with zeros padding (summed over the N frames), or None
    where not served.

    Args:
        grad: (N, O, *spatial), the output's gradient, any layout.
        x: (N, C, *spatial), the input.
        weight: (O, C, *k), read for its shape.
        dilation: one int per spatial dim.

    Returns:
        (O, C, *k) contiguous, or None.
    """
    lib = _library()
    pg = None if lib is None else _grad_pixel_stride(grad, x, x.shape, weight, dilation)
    if pg is None:
        return None
    n, c, *spatial = x.shape
    kernel = weight.shape[2:]
    o, pixels = weight.shape[0], math.prod(spatial)
    taps = math.prod(kernel)
    dw = torch.empty(o, c * taps, dtype=_F32)
    # Where grad reads as (N * pixels, O) (channels-last frames back to back): one product
    # with the columns pixel-major. Else (channels-first frames: 3-d) tcl_weight_grad, a
    # product a frame and chunk of channels in C (from Python they had run no faster than
    # torch's: 3-d 8x8x8 B4 129 vs 115 us).
    if not (pg == o and grad.stride(1) == 1 and grad.stride(0) == pixels * o):
        px = _pixel_stride(x)
        if px is None or not _grad_in_c(lib, "weight", grad, pg, dw, x, px, kernel, dilation):
            return None
        return dw.view(weight.shape)
    frames, channels = _chunks(n, c, taps * pixels)
    for c0 in range(0, c, channels):
        c1 = min(c, c0 + channels)
        part = dw[:, c0 * taps : c1 * taps]
        for f0 in range(0, n, frames):
            f1 = min(n, f0 + frames)
            cols = _columns(lib, x[f0:f1, c0:c1], None, kernel, dilation, pixels_major=True)
            if cols is None:
                return None
            g = grad[f0:f1].as_strided(((f1 - f0) * pixels, o), (o, 1))
            cols = cols.transpose(1, 2).reshape((f1 - f0) * pixels, -1)
            if f0 == 0:
                torch.mm(g.t(), cols, out=part)
            else:
                part.addmm_(g.t(), cols)
    return dw.view(weight.shape)
