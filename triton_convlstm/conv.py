"""'Same'-padded, bias-free convolutions and their two gradients, called straight into aten.

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

from .layout import memory_format_of

_aten = torch.ops.aten


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


def _split_padding(weight: Tensor, dilation) -> tuple[tuple[int, ...] | None, list[int]]:
    """(extra F.pad or None, symmetric conv padding)."""
    left, right, top, bottom = same_padding(tuple(weight.shape[2:]), tuple(dilation))
    if left == right and top == bottom:
        return None, [top, left]
    return (left, right, top, bottom), [0, 0]


def conv_same(x: Tensor, weight: Tensor, dilation: Sequence[int],
              bias: Tensor | None = None) -> Tensor:
    """The 'same'-padded convolution.

    Args:
        x: (N, C, H, W).
        weight: (O, C, kh, kw), x's dtype.
        dilation: (dh, dw).
        bias: (O,) or None.

    Returns:
        (N, O, H, W), x's dtype.
    """
    pad, padding = _split_padding(weight, dilation)
    if pad is not None:
        x = F.pad(x, pad)
    return F.conv2d(x, weight, bias, padding=padding, dilation=list(dilation))


def conv_same_input_grad(grad: Tensor, x_shape: Sequence[int], weight: Tensor,
                         dilation: Sequence[int]) -> Tensor:
    """Gradient of :func:`conv_same` w.r.t. its input.

    Args:
        grad: (N, O, H, W), the gradient of the output.
        x_shape: (N, C, H, W), the input's shape.
        weight: (O, C, kh, kw), grad's dtype.
        dilation: (dh, dw).

    Returns:
        (N, C, H, W), grad's dtype.
    """
    pad, padding = _split_padding(weight, dilation)
    n, _, h, w = x_shape
    c = weight.shape[1]
    if pad is not None:
        h, w = h + pad[2] + pad[3], w + pad[0] + pad[1]
    # convolution_backward reads the input only for its shape, dtype and layout when the weight
    # gradient is not requested; an uninitialised tensor (not an expanded scalar, which some
    # backends materialise with a fill) stands in for it.
    like = torch.empty((n, c, h, w), dtype=grad.dtype, device=grad.device,
                       memory_format=memory_format_of(grad))
    dx = _aten.convolution_backward(
        grad, like, weight, None, [1, 1], padding, list(dilation), False, [0, 0], 1,
        [True, False, False],
    )[0]
    if pad is not None:
        dx = dx[:, :, pad[2] : h - pad[3], pad[0] : w - pad[1]]
    return dx


def conv_same_weight_grad(grad: Tensor, x: Tensor, weight: Tensor,
                          dilation: Sequence[int]) -> Tensor:
    """Gradient of :func:`conv_same` w.r.t. its weight, summed over the N frames in one call.

    Args:
        grad: (N, O, H, W), the gradient of the output.
        x: (N, C, H, W), the input, grad's dtype.
        weight: (O, C, kh, kw), read for its shape.
        dilation: (dh, dw).

    Returns:
        (O, C, kh, kw), grad's dtype.
    """
    pad, padding = _split_padding(weight, dilation)
    if pad is not None:
        x = F.pad(x, pad)
    return _aten.convolution_backward(
        grad, x, weight, None, [1, 1], padding, list(dilation), False, [0, 0], 1,
        [False, True, False],
    )[1]
