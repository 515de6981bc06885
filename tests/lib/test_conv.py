"""conv.py's 'same' convolutions and their two gradients in every padding mode, for 1, 2 and 3
spatial dims, on CPU in float64: against autograd through ``F.pad`` + ``F.conv{1,2,3}d`` and
through ``nn.Conv{1,2,3}d``."""

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
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
NN_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _id(shape):
    return "x".join(map(str, shape))


# Per number of spatial dims: a small input's spatial size, kernels (odd, even, mixed with a 1)
# and dilations, each fitting "reflect" on that size (every pad less than its side).
SIZES = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}
KERNELS = {1: [(3,), (4,), (5,)],
           2: [(3, 3), (2, 4), (1, 5)],
           3: [(3, 3, 3), (2, 3, 4), (1, 2, 5)]}
DILATIONS = {1: [(1,), (2,)], 2: [(1, 1), (2, 1)], 3: [(1, 1, 1), (2, 1, 2)]}
CASES = [pytest.param(k, d, id=f"k{_id(k)}-d{_id(d)}")
         for nd in (1, 2, 3) for k in KERNELS[nd] for d in DILATIONS[nd]]
TOL = 1e-12


def _ref_pads(kernel, dilation):
    """F.pad's amounts for 'same', from the definition (last dim first): each dim pads
    total = d * (k - 1), total // 2 before and the rest after."""
    pads = []
    for k, d in zip(reversed(kernel), reversed(dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


def _data(kernel, size=None, n=2, c=3, o=2, bias=False, seed=0):
    size = SIZES[len(kernel)] if size is None else size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *size, generator=g, dtype=torch.float64)
    weight = torch.randn(o, c, *kernel, generator=g, dtype=torch.float64)
    b = torch.randn(o, generator=g, dtype=torch.float64) if bias else None
    grad = torch.randn(n, o, *size, generator=g, dtype=torch.float64)
    return x, weight, b, grad


def _autograd(fn, x, weight, bias, grad):
    """fn(x, weight, bias) and its gradients w.r.t. x and weight for the output gradient."""
    x, weight = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y = fn(x, weight, bias)
    dx, dw = torch.autograd.grad(y, (x, weight), grad)
    return y.detach(), dx, dw


def _padded(mode, dilation):
    def fn(x, weight, bias):
        pads = _ref_pads(tuple(weight.shape[2:]), dilation)
        return CONV[len(dilation)](F.pad(x, pads, mode=F_PAD_MODE[mode]), weight, bias,
                                   dilation=dilation)
    return fn


def _ours(x, weight, bias, grad, dilation, mode):
    return (conv_same(x, weight, dilation, bias, padding_mode=mode),
            conv_same_input_grad(grad, x.shape, weight, dilation, padding_mode=mode),
            conv_same_weight_grad(grad, x, weight, dilation, padding_mode=mode))


def _assert_close(got, want):
    for name, a, e in zip(("output", "input grad", "weight grad"), got, want):
        err = rel_err(a, e)
        assert err <= TOL, f"{name}: rel err {err:.3g}"


def _channels_last(t):
    """t with its channels as the fast axis: (N, L, C) permuted for 1-d, channels_last(_3d)."""
    if t.dim() == 3:
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4
                        else torch.channels_last_3d)


@pytest.mark.parametrize(("kernel", "dilation", "want"), [
    ((3,), (1,), (1, 1)),
    ((4,), (1,), (1, 2)),
    ((4,), (2,), (3, 3)),
    ((3, 4), (2, 1), (1, 2, 2, 2)),  # (left, right, top, bottom)
    ((2, 2), (1, 1), (0, 1, 0, 1)),
    ((2, 3, 4), (1, 2, 1), (1, 2, 2, 2, 0, 1)),  # W's pair, H's, D's
    ((1, 1, 1), (3, 2, 1), (0, 0, 0, 0, 0, 0)),
])
def test_same_padding(kernel, dilation, want):
    assert same_padding(kernel, dilation) == want
    assert same_padding(list(kernel), list(dilation)) == want
    assert list(want) == _ref_pads(kernel, dilation)


def test_same_padding_needs_a_dilation_per_dim():
    for kernel, dilation in (((3, 3), (1,)), ((3,), (1, 1)), ((3, 3, 3), (1, 1))):
        with pytest.raises(ValueError, match="as many dims"):
            same_padding(kernel, dilation)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("kernel", "dilation"), CASES)
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_matches_autograd_through_f_pad(mode, kernel, dilation, bias):
    x, weight, b, grad = _data(kernel, bias=bias)
    want = _autograd(_padded(mode, dilation), x, weight, b, grad)
    _assert_close(_ours(x, weight, b, grad, dilation, mode), want)


# nn.Conv*d's note that padding="same" with an even kernel pads a copy of the input.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(("kernel", "dilation"), CASES)
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_matches_nn_conv(mode, kernel, dilation):
    """nn.Conv*d(padding="same") pads left = total // 2 as this module does, so it matches for
    every kernel; an odd kernel also matches the symmetric integer padding. With a bias (the
    test above takes both)."""
    bias = True
    x, weight, b, grad = _data(kernel, bias=bias)
    paddings = ["same"]
    if all(k % 2 for k in kernel):
        paddings.append(tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation)))
    ours = _ours(x, weight, b, grad, dilation, mode)
    for padding in paddings:
        conv = NN_CONV[len(kernel)](3, 2, kernel, padding=padding, dilation=dilation,
                                    bias=bias, padding_mode=mode, dtype=torch.float64)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias:
                conv.bias.copy_(b)
        xg = x.clone().requires_grad_()
        y = conv(xg)
        dx, dw = torch.autograd.grad(y, (xg, conv.weight), grad)
        _assert_close(ours, (y.detach(), dx, dw))


@pytest.mark.parametrize("kernel", [KERNELS[nd][i] for nd in (1, 2, 3) for i in (0, 1)],
                         ids=_id)
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_channels_last(mode, kernel):
    nd = len(kernel)
    dilation = DILATIONS[nd][1]
    x, weight, b, grad = _data(kernel, bias=True)
    want = _autograd(_padded(mode, dilation), x, weight, b, grad)
    x, weight, grad = _channels_last(x), _channels_last(weight), _channels_last(grad)
    assert x.stride(1) == weight.stride(1) == grad.stride(1) == 1
    got = _ours(x, weight, b, grad, dilation, mode)
    _assert_close(got, want)
    # The input gradient keeps grad's layout where the backend's convolution backward does:
    # on CPU for 2-d (for 1-d there is no channels-last format, 3-d float64 comes contiguous).
    if nd == 2 and mode in ("zeros", "circular"):
        assert got[1].stride(1) == 1, got[1].stride()


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_1x1_kernel_pads_nothing(mode, nd):
    x, weight, b, grad = _data((1,) * nd, bias=True)
    _assert_close(_ours(x, weight, b, grad, (1,) * nd, mode),
                  _autograd(_padded(mode, (1,) * nd), x, weight, b, grad))


def _f_pad_error(x, weight, dilation, mode):
    """The exception F.pad raises for this 'same' pad, or None."""
    try:
        F.pad(x, _ref_pads(tuple(weight.shape[2:]), dilation), mode=F_PAD_MODE[mode])
    except Exception as e:
        return e
    return None


# (spatial size, kernel): pads up to and past each side, one dim at a time where the sides
# differ (so a check on the wrong dim shows).
PAD_FIT_CASES = [
    ((2,), (4,)), ((2,), (5,)), ((2,), (7,)),
    ((2, 2), (5, 5)), ((2, 2), (4, 4)), ((2, 2), (5, 1)), ((2, 2), (7, 7)),
    ((2, 4), (5, 1)), ((2, 4), (1, 5)), ((4, 2), (1, 7)),
    ((2, 3, 4), (5, 1, 1)), ((2, 3, 4), (7, 1, 1)), ((2, 3, 4), (1, 7, 1)),
    ((2, 3, 4), (1, 1, 9)), ((2, 3, 4), (1, 1, 11)), ((4, 3, 2), (1, 1, 5)),
    ((2, 3, 4), (3, 5, 7)),
]


@pytest.mark.parametrize(("size", "kernel"), PAD_FIT_CASES,
                         ids=[f"{_id(s)}-k{_id(k)}" for s, k in PAD_FIT_CASES])
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_pad_up_to_image_size(mode, size, kernel):
    """A pad as big as its side (k=5 on 2, or the end of k=4) is allowed by circular and refused
    by reflect; one bigger (k=7 on 2) wraps circular twice; zeros and replicate take any. Where
    F.pad raises, all three functions raise it (the input gradient, which calls no F.pad, a
    RuntimeError in F.pad's words)."""
    nd = len(size)
    x, weight, b, grad = _data(kernel, size=size, bias=True)
    # Each dim's bigger pad (the end one) against its side.
    ends = [(k - 1) - (k - 1) // 2 for k in kernel]
    err = _f_pad_error(x, weight, (1,) * nd, mode)
    assert (err is not None) == (
        (mode == "reflect" and any(e >= s for e, s in zip(ends, size)))
        or (mode == "circular" and any(e > s for e, s in zip(ends, size)))), err
    if err is None:
        _assert_close(_ours(x, weight, b, grad, (1,) * nd, mode),
                      _autograd(_padded(mode, (1,) * nd), x, weight, b, grad))
        return
    for call in (lambda: conv_same(x, weight, (1,) * nd, b, padding_mode=mode),
                 lambda: conv_same_weight_grad(grad, x, weight, (1,) * nd, padding_mode=mode)):
        with pytest.raises(type(err)) as info:
            call()
        assert str(info.value) == str(err)
    words = ("Padding size should be less than the corresponding input dimension"
             if mode == "reflect" else "Padding value causes wrapping around more than once")
    assert words in str(err)
    with pytest.raises(type(err), match=words):
        conv_same_input_grad(grad, x.shape, weight, (1,) * nd, padding_mode=mode)


@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("bad", ["constant", "reflection", "Zeros", ""])
def test_bad_mode_raises_value_error(bad, nd):
    x, weight, _, grad = _data((3,) * nd)
    dilation = (1,) * nd
    calls = [
        lambda: conv_same(x, weight, dilation, padding_mode=bad),
        lambda: conv_same_input_grad(grad, x.shape, weight, dilation, padding_mode=bad),
        lambda: conv_same_weight_grad(grad, x, weight, dilation, padding_mode=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="padding_mode") as info:
            call()
        assert all(m in str(info.value) for m in PADDING_MODES)
        assert repr(bad) in str(info.value)


@pytest.mark.parametrize("kernel", [k for nd in (1, 2, 3) for k in KERNELS[nd]], ids=_id)
@pytest.mark.parametrize("mode", PADDING_MODES)
def test_meta_device_shapes(mode, kernel):
    nd = len(kernel)
    size, dilation = SIZES[nd], DILATIONS[nd][1]
    x = torch.empty(2, 3, *size, device="meta")
    weight = torch.empty(4, 3, *kernel, device="meta")
    grad = torch.empty(2, 4, *size, device="meta")
    bias = torch.empty(4, device="meta")
    y = conv_same(x, weight, dilation, bias, padding_mode=mode)
    dx = conv_same_input_grad(grad, x.shape, weight, dilation, padding_mode=mode)
    dw = conv_same_weight_grad(grad, x, weight, dilation, padding_mode=mode)
    assert (y.device.type, dx.device.type, dw.device.type) == ("meta",) * 3
    assert (y.shape, dx.shape, dw.shape) == ((2, 4, *size), (2, 3, *size), (4, 3, *kernel))
