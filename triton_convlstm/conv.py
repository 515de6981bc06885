"""'Same'-padded, bias-free convolutions and their two gradients, called straight into aten,
for 1, 2 or 3 spatial dims: x is (N, C, *spatial) with spatial (L,), (H, W) or (D, H, W), and
the weight (O, C, *k) has as many kernel dims.

Each takes ``nn.Conv2d``'s ``padding_mode`` ("zeros", "reflect", "replicate", "circular") with
this module's 'same' amounts (:func:`same_padding`); any mode but "zeros" pads with ``F.pad``
and convolves unpadded.

The fast path convolves without bias (the gate kernel adds it: a bias on a bf16 channels_last
cuDNN convolution measured 2-3x slower) and computes gradients with
``aten.convolution_backward`` asking only for what it needs (``torch.nn.grad.conv2d_input``
measured 5x slower than that). All of it is plain tensor ops without a host sync, so the
sequence backward can call it inside CUDA-graph capture.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache, wraps

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import empty_like_layout

_aten = torch.ops.aten

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# F.pad's name for each mode.
_F_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
               "circular": "circular"}
# The convolution for each number of spatial dims.
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# F.pad's backward for "reflect" and "replicate", by the number of spatial dims.
_PAD_BACKWARD = {
    "reflect": {1: _aten.reflection_pad1d_backward, 2: _aten.reflection_pad2d_backward,
                3: _aten.reflection_pad3d_backward},
    "replicate": {1: _aten.replication_pad1d_backward, 2: _aten.replication_pad2d_backward,
                  3: _aten.replication_pad3d_backward},
}


def same_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """F.pad amounts that keep every spatial size, in F.pad's order (last dim first); an even
    kernel pads one more at the end of its dim.

    Each dim pads d * (k - 1) in all, total // 2 before and the rest after.

    Args:
        kernel_size: (k,), (kh, kw) or (kd, kh, kw).
        dilation: as many ints, one per dim.

    Returns:
        2 ints per dim: (lo, hi) of L for 1-d; (left, right, top, bottom) for 2-d;
        (left, right, top, bottom, front, back) for 3-d.

    >>> same_padding((3, 4), (2, 1))
    (1, 2, 2, 2)
    """
    if len(kernel_size) != len(dilation):
        raise ValueError(f"kernel_size {tuple(kernel_size)} and dilation {tuple(dilation)} "
                         "must have as many dims")
    if len(kernel_size) == 2:  # unrolled: each step's convolutions ask (the loop costs 3x)
        (kh, kw), (dh, dw) = kernel_size, dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    pad: tuple[int, ...] = ()
    for k, d in zip(kernel_size[::-1], dilation[::-1]):
        total = d * (k - 1)
        pad += (total // 2, total - total // 2)
    return pad


def _memoised(fn):
    """fn with an lru_cache, except while dynamo traces (it warns on every cache-wrapped call,
    and a user compiling a model should see no warning of ours): it then traces fn itself."""
    cached = lru_cache(maxsize=256)(fn)

    @wraps(fn)
    def call(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        return cached(*args)

    return call


@_memoised
def module_padding(kernel_size: tuple[int, ...],
                   dilation: tuple[int, ...]) -> tuple[int, ...] | str:
    """The ``padding`` argument of an nn.Conv{n}d that pads as :func:`same_padding`: one int
    per dim where the padding is symmetric (odd kernels: k // 2 without dilation, as the
    popular module), else "same" (nn.Conv{n}d then pads the extra pixel at the end).
    Memoised: the cells' one-frame path compares with it every call."""
    pads = same_padding(kernel_size, dilation)  # F.pad order: last dim first
    lo, hi = pads[0::2][::-1], pads[1::2][::-1]
    return tuple(lo) if lo == hi else "same"


def _split_padding(weight: Tensor, dilation: Sequence[int],
                   padding_mode: str) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    """(extra F.pad amounts (:func:`same_padding`'s) or None, symmetric conv padding per dim,
    first dim first). Memoised by sizes (a CPU step asks every time; ~3 us of Python)."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    return _split_padding_of(tuple(weight.shape[2:]), tuple(dilation), padding_mode)


@_memoised
def _split_padding_of(kernel_size: tuple[int, ...], dilation: tuple[int, ...],
                      padding_mode: str) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    pad = same_padding(kernel_size, dilation)
    if len(pad) == 4:  # unrolled, as in same_padding
        left, right, top, bottom = pad
        symmetric, padding = left == right and top == bottom, (top, left)
    else:
        symmetric, padding = pad[::2] == pad[1::2], tuple(pad[-2::-2])
    # Symmetric zeros pad inside the convolution; no padding at all (a 1x1 kernel) is the same
    # convolution in every mode.
    if symmetric and (padding_mode == "zeros" or not any(pad)):
        return None, padding
    return tuple(pad), (0,) * len(padding)


def pad_fits(pad: Sequence[int], spatial: Sequence[int], padding_mode: str) -> bool:
    """Whether ``F.pad(x, pad, mode)`` takes frames of these sizes: "reflect" mirrors inside
    (each pad less than its side), "circular" wraps once (at most its side); "zeros" and
    "replicate" pad any size.

    Args:
        pad: :func:`same_padding`'s amounts (last dim first).
        spatial: the input's spatial sizes (first dim first).
        padding_mode: one of :data:`PADDING_MODES`.
    """
    if padding_mode not in ("reflect", "circular"):
        return True
    # Each dim's bigger pad, in pad's order (last dim first) as the sizes beside them.
    pairs = [(max(lo, hi), n) for lo, hi, n in zip(pad[::2], pad[1::2], spatial[::-1])]
    if padding_mode == "reflect":
        return all(p < n for p, n in pairs)
    return all(p <= n for p, n in pairs)


def _check_pad_fits(pad: Sequence[int], spatial: Sequence[int], padding_mode: str) -> None:
    """Raise what ``F.pad`` raises on an input of these spatial sizes this pad does not fit.

    Only the input gradient needs it (the others call F.pad): reflection_pad2d_backward does
    not check (on CPU, torch 2.13, a pad of 2 on a 2x2 image aborted the process with a heap
    corruption), and the circular fold would silently drop what wraps twice.

    Args:
        pad: :func:`same_padding`'s amounts (last dim first).
        spatial: the input's spatial sizes (first dim first).
        padding_mode: one of :data:`PADDING_MODES`.
    """
    if pad_fits(pad, spatial, padding_mode):
        return
    where = (f"padding {tuple(pad)} (F.pad's order, last dim first) of an input of spatial "
             f"size {tuple(spatial)}")
    if padding_mode == "reflect":
        raise RuntimeError("Padding size should be less than the corresponding input "
                           f"dimension, but got: {where}")
    raise RuntimeError(f"Padding value causes wrapping around more than once: {where}")


def _pad_backward(grad: Tensor, x_shape: Sequence[int], pad: Sequence[int],
                  padding_mode: str) -> Tensor:
    """Gradient w.r.t. x of ``F.pad(x, pad, mode)``, given the padded result's gradient.

    Args:
        grad: (N, C, *padded), each spatial size grown by its dim's two pads.
        x_shape: (N, C, *spatial).
        pad: :func:`same_padding`'s amounts (last dim first).
        padding_mode: one of :data:`PADDING_MODES`.

    Returns:
        (N, C, *spatial), grad's dtype; a view of grad for "zeros" and "circular" (whose
        borders it adds onto grad in place).
    """
    spatial = x_shape[2:]
    lo = pad[-2::-2]  # the pads before each dim, first dim first
    if padding_mode == "zeros":
        return grad[(..., *[slice(p, p + n) for p, n in zip(lo, spatial)])]
    if padding_mode == "circular":
        # The pad before a dim is x's last `before` entries along it, the one after its first
        # `after` (each at most the size: F.pad refuses to wrap twice; a 0 pad adds an empty
        # slice). One dim at a time, each over the others' whole extent (padded or already
        # folded), so the corners follow; innermost first, as the 2-d fold always did.
        g, hi = grad, pad[::-2]
        for dim in range(len(spatial) + 1, 1, -1):
            before, after, n = lo[dim - 2], hi[dim - 2], spatial[dim - 2]
            core = g.narrow(dim, before, n)
            core.narrow(dim, n - before, before).add_(g.narrow(dim, 0, before))
            core.narrow(dim, 0, after).add_(g.narrow(dim, before + n, after))
            g = core
        return g
    # Both ops read x only for its shape: an expanded scalar stands in for it (the CPU and meta
    # kernels allocate the result themselves, contiguous for this input; not run on CUDA yet).
    like = grad.new_empty(()).expand(tuple(x_shape))
    return _PAD_BACKWARD[padding_mode][len(spatial)](grad, like, list(pad))


def _padded(x: Tensor, weight: Tensor, dilation: Sequence[int],
            padding_mode: str) -> tuple[Tensor, tuple[int, ...]]:
    """x padded where the convolution cannot pad itself, and the padding left to it."""
    pad, padding = _split_padding(weight, dilation, padding_mode)
    if pad is not None:
        x = F.pad(x, pad, mode=_F_PAD_MODE[padding_mode])
    return x, padding


def conv_same(x: Tensor, weight: Tensor, dilation: Sequence[int],
              bias: Tensor | None = None, *, padding_mode: str = "zeros") -> Tensor:
    """The 'same'-padded convolution (``F.conv1d``, ``conv2d`` or ``conv3d`` by the dims).

    Args:
        x: (N, C, *spatial), spatial (L,), (H, W) or (D, H, W).
        weight: (O, C, *k), as many kernel dims, x's dtype.
        dilation: one int per spatial dim.
        bias: (O,) or None.
        padding_mode: one of :data:`PADDING_MODES`, as ``nn.Conv2d``'s.

    Returns:
        (N, O, *spatial), x's dtype.
    """
    x, padding = _padded(x, weight, dilation, padding_mode)
    return _CONV[len(padding)](x, weight, bias, 1, padding, dilation)


def conv_same_input_grad(grad: Tensor, x_shape: Sequence[int], weight: Tensor,
                         dilation: Sequence[int], *, padding_mode: str = "zeros") -> Tensor:
    """Gradient of :func:`conv_same` w.r.t. its input.

    Args:
        grad: (N, O, *spatial), the gradient of the output.
        x_shape: (N, C, *spatial), the input's shape.
        weight: (O, C, *k), grad's dtype.
        dilation: one int per spatial dim.
        padding_mode: one of :data:`PADDING_MODES`, as ``nn.Conv2d``'s.

    Returns:
        (N, C, *spatial), grad's dtype; laid out as the backend's convolution backward
        gives it for grad's layout (grad's memory format on CPU for 2-d; contiguous on CPU
        for 1-d, which torch knows no channels-last format for, and for float64 3-d), except
        for "reflect" and "replicate" (contiguous: their pad backward allocates it).
    """
    pad, padding = _split_padding(weight, dilation, padding_mode)
    n, _, *spatial = x_shape
    c = weight.shape[1]
    shape = (n, c, *spatial)
    if pad is not None:
        _check_pad_fits(pad, spatial, padding_mode)
        shape = (n, c, *[s + p + q for s, p, q in zip(spatial, pad[-2::-2], pad[::-2])])
    # convolution_backward reads the input only for its shape, dtype and layout when the weight
    # gradient is not requested; an uninitialised tensor (not an expanded scalar, which some
    # backends materialise with a fill) stands in for it.
    like = empty_like_layout(grad, c, shape=shape)
    nd = len(padding)
    dx = _aten.convolution_backward(
        grad, like, weight, None, [1] * nd, padding, list(dilation), False, [0] * nd, 1,
        [True, False, False],
    )[0]
    if pad is not None:
        dx = _pad_backward(dx, x_shape, pad, padding_mode)
    return dx


def conv_same_weight_grad(grad: Tensor, x: Tensor, weight: Tensor,
                          dilation: Sequence[int], *, padding_mode: str = "zeros") -> Tensor:
    """Gradient of :func:`conv_same` w.r.t. its weight, summed over the N frames in one call.

    Args:
        grad: (N, O, *spatial), the gradient of the output.
        x: (N, C, *spatial), the input itself.
        weight: (O, C, *k), read for its shape.
        dilation: one int per spatial dim.
        padding_mode: one of :data:`PADDING_MODES`, as ``nn.Conv2d``'s.

    Returns:
        (O, C, *k), grad's dtype.
    """
    x, padding = _padded(x, weight, dilation, padding_mode)
    nd = len(padding)
    return _aten.convolution_backward(
        grad, x, weight, None, [1] * nd, padding, list(dilation), False, [0] * nd, 1,
        [False, True, False],
    )[1]
