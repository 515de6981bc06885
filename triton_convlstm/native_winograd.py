"""3x3 'same' convolutions of fp32 channels-last frames on CPU by Winograd's F(2x2, 3x3)
(``csrc/winograd.c``): 16 matrix products a block of 2x2 output tiles instead of the 36
multiplies a pixel pair of a direct convolution, for 2.25x fewer multiplies.

Where a layer's step is mostly its convolution (C + hidden >= 16 channels), oneDNN's direct
convolution already runs near the core's peak; this runs the same step 1.7-2.4x faster
(one thread, the convolution with its concatenation; session 13 in docs/PERF_NOTES.md).
Its error against float64 (4e-7 relative) is below the direct sum's (1e-6): the input and
output transforms are sums and differences, the weight's is summed in double.

native_step runs whole steps with it (:func:`fits` picks them); :func:`input_grad` serves
the backward's input gradients (the same convolution of the gradient with the weight's
channels swapped and taps flipped) and :func:`weight_grad` its weight gradients (the
adjoint: the products summed over the tiles, in the transformed domain).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from .native_build import Layout, WinogradPlan
from .native_conv import _NO_LAYOUT, _pixel_stride, plain_fp32
from .native_gates import _library, _run, memoised

# Tiles per block: as many as keep V (16 x block x C) and the products (16 x block x O)
# within BLOCK_BYTES (the core's L2 is 2 MiB here), 32 to 256. Measured (one thread, us a
# convolution by block): B8 C16+64 32x32 (21 KiB a tile) 32: 14563, 64: 11724, 128: 12026,
# 256: 15664; B4 C4+8 32x32 (2.8 KiB) 32: 526, 64: 471, 186: 438 (fewer, larger products: the
# BLAS's fixed cost per call shows at few channels). Fewer, down to MIN_BLOCK, where the two
# would outgrow the convolution's own output (small frames): the scratch counts in a training
# step's peak (cpu-s: 1.14x the formulation's with 64 and the weight's transform in float64
# torch ops; 0.95x with 8, 0.97x with 32). Below 32 the products get too small: cpu-s's
# recurrent input gradient (B2 64 -> 16 16x16) 144 us with 8, 100 with 32, 88 with 64.
BLOCK_BYTES, MIN_BLOCK, MAX_BLOCK = 3 << 19, 32, 256
# With several threads, the tiles are shared (each thread a share of whole blocks, at least
# THREAD_BLOCKS of them and THREAD_MACS multiply-adds) where that keeps at least half the
# threads busy (2.25x fewer multiplies than oneDNN's convolution on all of them); else torch's
# convolution serves. The shares run on torch's own OpenMP workers (parallel.c). Measured on 2
# threads (2-core box, same-run ratios against the formulation), THREAD_MACS 512K / 2M / 8M /
# 32M: cpu-m inference 2.32 / 2.34 / 2.22 / 1.35x, training 1.70 / 1.69 / 1.68 / 1.35x;
# cpu-hid8 inference 1.21 / 1.20 / 0.92 / 0.93x; cpu-s training 1.72 / 1.51 / 1.53 / 1.52x,
# inference 2.08 / 2.13 / 2.16 / 2.18x. (Session 13's Python pool had waited for the core
# torch's spinning workers held: 32M was best then, and cpu-m gained nothing from sharing.)
THREAD_BLOCKS, THREAD_MACS = 2, 1 << 20
# Fewer channels than this (C + hidden): oneDNN's convolution, or the columns, are as quick
# (B1 C1+8 64x64: 0.95-1.06x; B2 C1+16 64x64: 0.97-1.13x; B2 C4+16 16x16: 1.9x).
MIN_CHANNELS = 8
# The input gradient into fewer channels than this: torch's, or native_conv's columns, are as
# quick (per call, one thread: 256 -> 16 channels B8 32x32 0.99x torch; 32 -> 8 B1 64x64
# 1.00x; 32 -> 1 0.72x; 64 -> 4 B2 16x16 1.63x torch but 1.13x the columns).
MIN_GRAD_CHANNELS = 16
# The weight gradient: from this many input channels and input x output channels (fewer: the
# transforms, per tile and channel, outweigh the products saved). Measured (one thread, against
# torch's, frames x out x in, 32x24 frames unless said): 28 x 128 x 32 1.33x; 32 x 128 x 8
# 0.95x; 14 x 64 x 16 16x16 1.09x; 15 x 32 x 8 64x64 0.68x; 120 x 256 x 64 32x32 1.74x;
# 128 x 256 x 16 32x32 1.69x. Error against float64 4e-7 to 1e-6 (torch's 5e-7 to 7e-6).
MIN_WEIGHT_GRAD_CHANNELS, MIN_WEIGHT_GRAD_PAIRS = 16, 2048
# On several threads, the weight gradient's share per thread (see split_plan). On 2 threads
# (training, against the formulation) 16M / 64M / 512M: cpu-m 1.73 / 1.73 / 1.68x, cpu-hid8
# 1.39 / 1.42 / 1.38x, cpu-s-bi 1.75 / 1.74 / 1.70x.
WEIGHT_GRAD_THREAD_MACS = 1 << 26
_TRANSFORMS: dict = {}  # (id(weight), transposed) -> (weakref, version, data_ptr, transform)
_PLANS: dict = {}  # the input gradient's: grad's sizes and strides, C -> (plan, scratch)


def fits(spatial: Sequence[int], kernel: Sequence[int], dilation: Sequence[int],
         channels: int, out: int = 0) -> bool:
    """Whether a convolution of these sizes is served here: 2-d 3x3, no dilation, at least
    MIN_CHANNELS input channels (and sizes the C side's int products take)."""
    return (len(spatial) == 2 and tuple(kernel) == (3, 3) and tuple(dilation) == (1, 1)
            and channels >= MIN_CHANNELS and min(spatial) > 0
            and MAX_BLOCK * max(channels, out) < 2**31)


def transform_weight(weight: Tensor, transposed: bool = False) -> Tensor:
    """U (16, C, O) fp32 for a (O, C, 3, 3) fp32 weight: U[4a + b, c, o] = (G w[o, c] G^T)[a,
    b], summed in double (``tcl_winograd_weight``); ``transposed``: the same of the input
    gradient's weight, w's channels swapped and taps flipped, (16, O, C). Kept while the
    weight lives and is unchanged (its version counter and storage): made once per layer
    call, or once per optimizer step. The caller has the library."""
    key, version, ptr = (id(weight), transposed), weight._version, weight.data_ptr()
    hit = _TRANSFORMS.get(key)
    if hit is not None and hit[0]() is weight and hit[1:3] == (version, ptr):
        return hit[3]
    o, c = weight.shape[:2]
    u = torch.empty(16, *((o, c) if transposed else (c, o)), dtype=torch.float32)
    _library().tcl_winograd_weight(o, c, ptr, *weight.stride(), int(transposed), u.data_ptr())
    _TRANSFORMS[key] = (weakref.ref(weight, lambda _, k=key: _TRANSFORMS.pop(k, None)),
                        version, ptr, u)
    return u


def make_plan(batch: int, spatial: Sequence[int], x: Layout, h: Layout, out: int,
              u_channels: int, z_sample: int, z_pixel: int) -> WinogradPlan:
    """winograd.c's sizes: x's and h's layouts (``h.channels`` 0 without h), ``out``
    channels, the transform's channels (its matrices' rows: it may have more than the call
    convolves, for the zero state's x alone), z's strides per sample and pixel. All the
    tiles, the products on the BLAS's own threads."""
    height, width = spatial
    per_tile = 16 * (x.channels + h.channels + out)  # V's and M's floats
    block = max(MIN_BLOCK, min(MAX_BLOCK, BLOCK_BYTES // (4 * per_tile),
                               batch * height * width * out // per_tile))
    if block > 32:  # (whole 32s: 73 tiles ran 12% slower than 64 at B8 C16+64 32x32)
        block -= block % 32
    tiles_h, tiles_w = -(-height // 2), -(-width // 2)
    return WinogradPlan(
        B=batch, H=height, W=width, tiles_h=tiles_h, tiles_w=tiles_w, x=x, h=h,
        channels=x.channels + h.channels, out=out, u_step=u_channels * out,
        z_sample=z_sample, z_pixel=z_pixel, block=block, tile_begin=0,
        tile_end=batch * tiles_h * tiles_w, gemm_threads=0)


def split_plan(lib, plan: WinogradPlan, threads: int,
               thread_macs: int | None = None) -> tuple[list[WinogradPlan], int] | None:
    """The plan for ``threads`` threads and each part's scratch floats: on one thread, the
    plan itself; on several, one plan per thread, each a share of the tiles in whole blocks
    and its products on one BLAS thread (as oneDNN shares a convolution: a block's small
    products on the BLAS's threads, the transforms on one, scaled poorly), or None where too
    few threads would be busy (each ``thread_macs`` multiply-adds, default THREAD_MACS)."""
    floats = scratch_floats(lib, plan)
    if threads < 2:
        return [plan], floats
    macs = 16 * plan.tile_end * plan.channels * plan.out
    thread_macs = THREAD_MACS if thread_macs is None else thread_macs
    parts = min(threads, plan.tile_end // (THREAD_BLOCKS * plan.block), macs // thread_macs)
    if parts < max(2, -(-threads // 2)):
        return None
    blocks = -(-plan.tile_end // plan.block)
    plans = []
    for k in range(parts):  # (whole blocks each, as even as they divide)
        part = WinogradPlan.from_buffer_copy(plan)
        part.tile_begin = k * blocks // parts * plan.block
        part.tile_end = min(plan.tile_end, (k + 1) * blocks // parts * plan.block)
        part.gemm_threads = 1
        plans.append(part)
    return plans, floats


def run(lib, plans: Sequence[WinogradPlan], floats: int, scratch: Tensor, x: int,
        h: int | None, u: int, bias: int | None, z: int) -> None:
    """tcl_winograd3x3 for each plan (on threads when there are several: native_gates'
    pool), each with its ``floats`` of ``scratch`` (a tensor of at least len(plans) *
    floats fp32); the tensors by address. The plans came from :func:`split_plan` of a plan
    :func:`fits` served, so that the C side cannot decline."""
    base = scratch.data_ptr()
    _run(lib.tcl_winograd3x3, list(plans), x, h, u, bias, z,
         [base + 4 * k * floats for k in range(len(plans))])


def scratch_floats(lib, plan: WinogradPlan) -> int:
    return int(lib.tcl_winograd_scratch(plan))


def input_grad(grad: Tensor, x_shape: Sequence[int], weight: Tensor, dilation: Sequence[int],
               channels_last: bool) -> Tensor | None:
    """``conv.conv_same_input_grad`` with zeros padding (a 3x3 'same' convolution of the
    gradient with the weight's channels swapped and taps flipped) as a new channels-last
    tensor, or None where not served: not :func:`fits`, not channels-last, grad not fp32
    with dense channels, no library or sgemm.

    Args:
        grad: (N, O, H, W), the output's gradient.
        x_shape: (N, C, H, W).
        weight: (O, C, 3, 3).
        dilation: (1, 1) to be served.
        channels_last: the caller's frames' layout (the result's).
    """
    n, c, *spatial = x_shape
    o = weight.shape[0]
    if not (channels_last and c >= MIN_GRAD_CHANNELS
            and fits(spatial, weight.shape[2:], dilation, o, c)):
        return None
    found = _gradient_read(grad, (n, o, *spatial), weight)
    if found is None:
        return None
    lib, pixel = found
    threads = torch.get_num_threads()
    split = memoised(_PLANS, (grad.shape, grad.stride(), c, threads),
                     lambda: _grad_plans(lib, grad, pixel, c, threads), 256)
    if split is None:
        return None
    plans, floats = split
    dx = torch.empty(n, *spatial, c, dtype=torch.float32).movedim(-1, 1)
    scratch = torch.empty(len(plans) * floats, dtype=torch.float32)
    u = transform_weight(weight, transposed=True)
    run(lib, plans, floats, scratch, grad.data_ptr(), None, u.data_ptr(), None, dx.data_ptr())
    return dx


def _grad_plans(lib, grad: Tensor, pixel: int, c: int,
                threads: int) -> tuple[list[WinogradPlan], int] | None:
    n, o, *spatial = grad.shape
    plan = make_plan(n, spatial, Layout(o, grad.stride(0), grad.stride(1), pixel), _NO_LAYOUT,
                     c, o, math.prod(spatial) * c, c)
    return split_plan(lib, plan, threads)


def _gradient_read(grad: Tensor, shape: Sequence[int], other: Tensor) -> tuple | None:
    """(the library, grad's pixel stride) where winograd.c reads grad as an output gradient
    of this shape (fp32 like ``other``, its channels dense, one pixel stride), else None."""
    lib = _library()
    if (lib is None or not lib.has_sgemm or not plain_fp32((grad, other))
            or tuple(grad.shape) != tuple(shape) or (grad.stride(1) != 1 and shape[1] > 1)):
        return None
    pixel = _pixel_stride(grad)
    return None if pixel is None else (lib, pixel)


def weight_grad(grad: Tensor, x: Tensor, weight: Tensor, dilation: Sequence[int],
                channels_last: bool) -> Tensor | None:
    """``conv.conv_same_weight_grad`` with zeros padding (summed over the N frames) by
    winograd.c, as a new contiguous (O, C, 3, 3) tensor, or None where not served: not
    :func:`fits`, too few channels (MIN_WEIGHT_GRAD_CHANNELS), not channels-last, too few
    multiply-adds to share on several threads (:func:`split_plan`; each thread then sums its
    share of the tiles), grad's channels not dense, no library or sgemm.

    Args:
        grad: (N, O, H, W), the output's gradient.
        x: (N, C, H, W), the input (any layout with one pixel stride).
        weight: (O, C, 3, 3), read for its shape.
        dilation: (1, 1) to be served.
        channels_last: the caller's frames' layout.
    """
    n, c, *spatial = x.shape
    o = weight.shape[0]
    if not (channels_last and c >= MIN_WEIGHT_GRAD_CHANNELS
            and c * o >= MIN_WEIGHT_GRAD_PAIRS
            and fits(spatial, weight.shape[2:], dilation, c, o)):
        return None
    found = _gradient_read(grad, (n, o, *spatial), x)
    px = _pixel_stride(x)
    if found is None or px is None:
        return None
    lib, pg = found
    plan = make_plan(n, spatial, Layout(c, x.stride(0), x.stride(1), px), _NO_LAYOUT, o, c,
                     grad.stride(0), pg)
    split = split_plan(lib, plan, torch.get_num_threads(), WEIGHT_GRAD_THREAD_MACS)
    if split is None:
        return None
    plans, floats = split
    # one sum per thread (its share of the tiles), added after
    du = torch.zeros(len(plans), 16, c, o, dtype=torch.float32)
    scratch = torch.empty(len(plans), floats, dtype=torch.float32)
    _run(lib.tcl_winograd_weight_grad, plans, x.data_ptr(), None, grad.data_ptr(),
         [d.data_ptr() for d in du], [s.data_ptr() for s in scratch])
    del scratch
    du = du[0] if len(plans) == 1 else du.sum(0)
    dw = torch.empty(o, c, 3, 3, dtype=torch.float32)
    lib.tcl_winograd_weight_back(o, c, du.data_ptr(), dw.data_ptr())
    return dw
