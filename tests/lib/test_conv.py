"""conv.py's 'same' convolutions and their two gradients in every padding mode, on CPU in
float64: against autograd through ``F.pad`` + ``F.conv2d`` and through ``nn.Conv2d``."""

import pytest
import torch
import torch.nn.functional as F
from reference_fp64 import rel_err
from torch import nn

from triton_convlstm.conv import (
    PADDING_MODES,
    conv_same,
    conv_same_input_grad,
    conv_same_weight_grad,
    same_padding,
)

F_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
              "circular": "circular"}
KERNELS = [(3, 3), (2, 4), (1, 5)]
DILATIONS = [(1, 1), (2, 1)]
TOL = 1e-12


def _data(kernel, n=2, c=3, o=2, h=5, w=6, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(o, c, *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(o, generator=g, dtype=torch.float64) if bias else None
    grad = torch.randn(n, o, h, w, generator=g, dtype=torch.float64)
    return x, weight, b, grad


def _autograd(fn, x, weight, bias, grad):
    """fn(x, weight, bias) and its gradients w.r.t. x and weight for the output gradient."""
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y = fn(x, weight, bias)
    dx, dw = torch.autograd.grad(y, (x, weight), grad)
    return y.detach(), dx, dw


def _padded(mode, dilation):
    def fn(x, weight, bias):
        pads = same_padding(tuple(weight.shape[2:]), dilation)
        return F.conv2d(F.pad(x, pads, mode=F_PAD_MODE[mode]), weight, bias, dilation=dilation)
    return fn


def _ours(x, weight, bias, grad, dilation, mode):
    return (conv_same(x, weight, dilation, bias, padding_mode=mode),
            conv_same_input_grad(grad, x.shape, weight, dilation, padding_mode=mode),
            conv_same_weight_grad(grad, x, weight, dilation, padding_mode=mode))


def _assert_close(got, want):
    for name, a, e in zip(("output", "input grad", "weight grad"), got, want):
        err = rel_err(a, e)
        assert err <= TOL, f"{name}: rel err {err:.3g}"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dilation", DILATIONS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_matches_autograd_through_f_pad(mode, kernel, dilation, bias):
    x, weight, b, grad = _data(kernel, bias=bias)
    want = _autograd(_padded(mode, dilation), x, weight, b, grad)
    _assert_close(_ours(x, weight, b, grad, dilation, mode), want)


# nn.Conv2d's note that padding="same" with an even kernel pads a copy of the input.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dilation", DILATIONS)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_matches_nn_conv2d(mode, kernel, dilation, bias):
    """nn.Conv2d(padding="same") pads left = total // 2 as this module does, so it matches for
    every kernel; an odd kernel also matches the symmetric integer padding."""
    x, weight, b, grad = _data(kernel, bias=bias)
    paddings = ["same"]
    if all(k % 2 for k in kernel):
        paddings.append(tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation)))
    ours = _ours(x, weight, b, grad, dilation, mode)
    for padding in paddings:
        conv = nn.Conv2d(3, 2, kernel, padding=padding, dilation=dilation, bias=bias,
                         padding_mode=mode, dtype=torch.float64)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias:
                conv.bias.copy_(b)
        xg = x.clone().requires_grad_()
        y = conv(xg)
        dx, dw = torch.autograd.grad(y, (xg, conv.weight), grad)
        _assert_close(ours, (y.detach(), dx, dw))


@pytest.mark.parametrize("kernel", [(3, 3), (2, 4)])
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_channels_last(mode, kernel):
    x, weight, b, grad = _data(kernel, bias=True)
    want = _autograd(_padded(mode, (2, 1)), x, weight, b, grad)
    cl = torch.channels_last
    got = _ours(x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl), b,
                grad.contiguous(memory_format=cl), (2, 1), mode)
    _assert_close(got, want)


@pytest.mark.parametrize("mode", PADDING_MODES)
def test_1x1_kernel_pads_nothing(mode):
    x, weight, b, grad = _data((1, 1), bias=True)
    _assert_close(_ours(x, weight, b, grad, (1, 1), mode),
                  _autograd(_padded(mode, (1, 1)), x, weight, b, grad))


def _f_pad_error(x, weight, dilation, mode):
    """The exception F.pad raises for this 'same' pad, or None."""
    try:
        F.pad(x, same_padding(tuple(weight.shape[2:]), dilation), mode=F_PAD_MODE[mode])
    except Exception as e:
        return e
    return None


@pytest.mark.parametrize("kernel", [(5, 5), (4, 4), (5, 1), (7, 7)])
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_pad_up_to_image_size(mode, kernel):
    """On a 2x2 image: a pad of 2 (k=5, or the bottom/right of k=4) is the image size, which
    circular allows and reflect refuses; 3 (k=7) wraps circular twice; zeros and replicate take
    any. Where F.pad raises, all three functions raise it (the input gradient, which calls no
    F.pad, a RuntimeError in F.pad's words)."""
    x, weight, b, grad = _data(kernel, h=2, w=2, bias=True)
    biggest = max(same_padding(kernel, (1, 1)))
    err = _f_pad_error(x, weight, (1, 1), mode)
    assert (err is not None) == ((mode == "reflect" and biggest >= 2)
                                 or (mode == "circular" and biggest > 2)), err
    if err is None:
        _assert_close(_ours(x, weight, b, grad, (1, 1), mode),
                      _autograd(_padded(mode, (1, 1)), x, weight, b, grad))
        return
    for call in (lambda: conv_same(x, weight, (1, 1), b, padding_mode=mode),
                 lambda: conv_same_weight_grad(grad, x, weight, (1, 1), padding_mode=mode)):
        with pytest.raises(type(err)) as info:
            call()
        assert str(info.value) == str(err)
    words = ("Padding size should be less than the corresponding input dimension"
             if mode == "reflect" else "Padding value causes wrapping around more than once")
    assert words in str(err)
    with pytest.raises(type(err), match=words):
        conv_same_input_grad(grad, x.shape, weight, (1, 1), padding_mode=mode)


@pytest.mark.parametrize("bad", ["constant", "reflection", "Zeros", ""])
def test_bad_mode_raises_value_error(bad):
    x, weight, _, grad = _data((3, 3))
    calls = [
        lambda: conv_same(x, weight, (1, 1), padding_mode=bad),
        lambda: conv_same_input_grad(grad, x.shape, weight, (1, 1), padding_mode=bad),
        lambda: conv_same_weight_grad(grad, x, weight, (1, 1), padding_mode=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="padding_mode") as info:
            call()
        assert all(m in str(info.value) for m in PADDING_MODES)
        assert repr(bad) in str(info.value)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_meta_device_shapes(mode, kernel):
    x = torch.empty(2, 3, 5, 6, device="meta")
    weight = torch.empty(4, 3, *kernel, device="meta")
    grad = torch.empty(2, 4, 5, 6, device="meta")
    bias = torch.empty(4, device="meta")
    y = conv_same(x, weight, (2, 1), bias, padding_mode=mode)
    dx = conv_same_input_grad(grad, x.shape, weight, (2, 1), padding_mode=mode)
    dw = conv_same_weight_grad(grad, x, weight, (2, 1), padding_mode=mode)
    assert (y.device.type, dx.device.type, dw.device.type) == ("meta",) * 3
    assert (y.shape, dx.shape, dw.shape) == ((2, 4, 5, 6), (2, 3, 5, 6), (4, 3, *kernel))
