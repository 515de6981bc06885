"""'Same'-padded, bias-free convolutions and their two gradients, called straight into aten.

Each takes ``nn.Conv2d``'s ``padding_mode`` ("zeros", "reflect", "replicate", "circular") with
this module's 'same' amounts (:func:`same_padding`); any mode but "zeros" pads with ``F.pad``
and convolves unpadded.

The fast path convolves without bias (the gate kernel adds it: a bias on a bf16 channels_last
cuDNN convolution measured 2-3x slower) and computes gradients with
``aten.convolution_backward`` asking only for what it needs (``torch.nn.grad.conv2d_input``
measured 5x slower than that).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import empty_like_layout

_aten = torch.ops.aten

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# F.pad's name for each mode.
_F_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
               "circular": "circular"}


def same_padding(kernel_size: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """F.pad amounts (left, right, top, bottom) that keep H, W; an even kernel pads one more at
    the bottom/right.

    Args:
        kernel_size: (kh, kw).
        dilation: (dh, dw).
    """
    (kh, kw), (dh, dw) = kernel_size, dilation
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return (tw // 2, tw - tw // 2, th // 2, th - th // 2)


def _split_padding(weight: Tensor, dilation,
                   padding_mode: str) -> tuple[tuple[int, int, int, int] | None, list[int]]:
    """(extra F.pad (left, right, top, bottom) or None, symmetric conv padding)."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    pad = same_padding(tuple(weight.shape[2:]), tuple(dilation))
    left, right, top, bottom = pad
    # No padding at all (a 1x1 kernel) is the same convolution in every mode.
    if padding_mode != "zeros" and any(pad):
        return pad, [0, 0]
    if left == right and top == bottom:
        return None, [top, left]
    return pad, [0, 0]


def _check_pad_fits(pad: tuple[int, int, int, int], h: int, w: int, padding_mode: str) -> None:
    """Raise what ``F.pad`` raises on an (H, W) input this pad does not fit.

    Only the input gradient needs it (the others call F.pad): reflection_pad2d_backward does
    not check (on CPU, torch 2.13, a pad of 2 on a 2x2 image aborted the process with a heap
    corruption), and the circular fold would silently drop what wraps twice.
    """
    left, right, top, bottom = pad
    if padding_mode == "reflect" and not (max(left, right) < w and max(top, bottom) < h):
        raise RuntimeError(
            "Padding size should be less than the corresponding input dimension, but got: "
            f"padding {pad} (left, right, top, bottom) of an input of H, W {h, w}")
    if padding_mode == "circular" and not (max(left, right) <= w and max(top, bottom) <= h):
        raise RuntimeError(
            f"Padding value causes wrapping around more than once: padding {pad} (left, right, "
            f"top, bottom) of an input of H, W {h, w}")


def _pad_backward(grad: Tensor, x_shape: Sequence[int], pad: tuple[int, int, int, int],
                  padding_mode: str) -> Tensor:
    """Gradient w.r.t. x of ``F.pad(x, pad, mode)``, given the padded result's gradient.

    Args:
        grad: (N, C, H + top + bottom, W + left + right).
        x_shape: (N, C, H, W).
        pad: (left, right, top, bottom).
        padding_mode: one of :data:`PADDING_MODES`.

    Returns:
        (N, C, H, W), grad's dtype; a view of grad for "zeros" and "circular" (whose borders it
        adds onto grad in place).
    """
    left, right, top, bottom = pad
    h, w = x_shape[2], x_shape[3]
    if padding_mode == "zeros":
        return grad[:, :, top : top + h, left : left + w]
    if padding_mode == "circular":
        # The left border is x's last `left` columns, the right one its first `right` (each at
        # most w: F.pad refuses to wrap twice); written with explicit ends so a 0 pad adds an
        # empty slice. Columns first over all padded rows, so the corners follow with the rows.
        g = grad[:, :, :, left : left + w]
        g[:, :, :, w - left : w].add_(grad[:, :, :, :left])
        g[:, :, :, :right].add_(grad[:, :, :, left + w :])
        dx = g[:, :, top : top + h]
        dx[:, :, h - top : h].add_(g[:, :, :top])
        dx[:, :, :bottom].add_(g[:, :, top + h :])
        return dx
    # Both ops read x only for its shape: an expanded scalar stands in for it (the CPU and meta
    # kernels allocate the result themselves, contiguous for this input; not run on CUDA yet).
    like = grad.new_empty(()).expand(x_shape)
    op = (_aten.reflection_pad2d_backward if padding_mode == "reflect"
          else _aten.replication_pad2d_backward)
    return op(grad, like, list(pad))


def _padded(x: Tensor, weight: Tensor, dilation: Sequence[int],
            padding_mode: str) -> tuple[Tensor, list[int]]:
    """x padded where the convolution cannot pad itself, and the padding left to it."""
    pad, padding = _split_padding(weight, dilation, padding_mode)
    if pad is not None:
        x = F.pad(x, pad, mode=_F_PAD_MODE[padding_mode])
    return x, padding


def conv_same(x: Tensor, weight: Tensor, dilation: Sequence[int],
              bias: Tensor | None = None, *, padding_mode: str = "zeros") -> Tensor:
    """The 'same'-padded convolution.

    Args:
        x: (N, C, H, W).
        weight: (O, C, kh, kw), x's dtype.
        dilation: (dh, dw).
        bias: (O,) or None.
        padding_mode: one of :data:`PADDING_MODES`, as ``nn.Conv2d``'s.

    Returns:
        (N, O, H, W), x's dtype.
    """
    x, padding = _padded(x, weight, dilation, padding_mode)
    return F.conv2d(x, weight, bias, padding=padding, dilation=list(dilation))


def conv_same_input_grad(grad: Tensor, x_shape: Sequence[int], weight: Tensor,
                         dilation: Sequence[int], *, padding_mode: str = "zeros") -> Tensor:
    """Gradient of :func:`conv_same` w.r.t. its input.

    Args:
        grad: (N, O, H, W), the gradient of the output.
        x_shape: (N, C, H, W), the input's shape.
        weight: (O, C, kh, kw), grad's dtype.
        dilation: (dh, dw).
        padding_mode: one of :data:`PADDING_MODES`, as ``nn.Conv2d``'s.

    Returns:
        (N, C, H, W), grad's dtype; grad's memory format, except for "reflect" and "replicate"
        (contiguous: their pad backward allocates it).
    """
    pad, padding = _split_padding(weight, dilation, padding_mode)
    n, _, h, w = x_shape
    c = weight.shape[1]
    hp, wp = h, w
    if pad is not None:
        _check_pad_fits(pad, h, w, padding_mode)
        hp, wp = h + pad[2] + pad[3], w + pad[0] + pad[1]
    # convolution_backward reads the input only for its shape, dtype and layout when the weight
    # gradient is not requested; an uninitialised tensor (not an expanded scalar, which some
    # backends materialise with a fill) stands in for it.
    like = empty_like_layout(grad, c, shape=(n, c, hp, wp))
    dx = _aten.convolution_backward(
        grad, like, weight, None, [1, 1], padding, list(dilation), False, [0, 0], 1,
        [True, False, False],
    )[0]
    if pad is not None:
        dx = _pad_backward(dx, (n, c, h, w), pad, padding_mode)
    return dx


def conv_same_weight_grad(grad: Tensor, x: Tensor, weight: Tensor,
                          dilation: Sequence[int], *, padding_mode: str = "zeros") -> Tensor:
    """Gradient of :func:`conv_same` w.r.t. its weight, summed over the N frames in one call:
    (O, C, kh, kw) in grad's dtype. Arguments as :func:`conv_same_input_grad`'s, with x the
    (N, C, H, W) input itself (weight is read for its shape)."""
    x, padding = _padded(x, weight, dilation, padding_mode)
    return _aten.convolution_backward(
        grad, x, weight, None, [1, 1], padding, list(dilation), False, [0, 0], 1,
        [False, True, False],
    )[1]
