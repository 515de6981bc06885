"""native_conv: small 1-d and 3-d convolutions and their gradients as C columns and matrix
products, against torch's convolution in float64 (conv.py, the functions they stand in for);
the calls they decline; and the layer, which gives the same results with and without them."""

import itertools
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from triton_convlstm import ConvLSTM1d, ConvLSTM3d, native_build, native_conv
from triton_convlstm.conv import conv_same, conv_same_input_grad, conv_same_weight_grad

pytestmark = pytest.mark.skipif(native_build.library() is None,
                                reason="no C compiler here: the torch convolution runs")


def _laid(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else t.contiguous()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not got.isnan().any()
    return ((got.double() - want).abs().max() / want.abs().max()).item()


CASES = list(itertools.product(
    [(7,), (4, 5, 6)],  # spatial
    [1, 2, 3],  # kernel (even: the odd pixel pads at the end)
    [1, 2],  # dilation
    [False, True],  # input channels-last
    [False, True],  # output channels-last
))


@pytest.mark.parametrize(("spatial", "k", "d", "cl_in", "cl_out"), CASES)
def test_the_convolution_and_its_input_gradient_match_torch(spatial, k, d, cl_in, cl_out):
    torch.manual_seed(0)
    n = len(spatial)
    kernel, dilation = (k,) * n, (d,) * n
    x = _laid(torch.randn(3, 2, *spatial, dtype=torch.float64), cl_in)
    h = _laid(torch.randn(3, 4, *spatial, dtype=torch.float64), cl_in)
    w = torch.randn(8, 6, *kernel, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    want = conv_same(torch.cat([x, h], 1), w, dilation, b)
    got = native_conv.conv_small(x.float(), h.float(), w.float(), b.float(), dilation, cl_out)
    assert got.shape == want.shape and _rel(got, want) < 1e-5
    assert (got.stride(1) == 1) == cl_out
    alone = native_conv.conv_small(x.float(), None, w[:, :2].float(), None, dilation, cl_out)
    assert _rel(alone, conv_same(x, w[:, :2], dilation)) < 1e-5

    grad = _laid(torch.randn_like(want), cl_in)
    want_dx = conv_same_input_grad(grad, (3, 6, *spatial), w, dilation)
    dx = native_conv.conv_input_grad_small(grad.float(), (3, 6, *spatial), w.float(), dilation,
                                           cl_out)
    assert dx.shape == want_dx.shape and _rel(dx, want_dx) < 1e-5
    assert (dx.stride(1) == 1) == cl_out


@pytest.mark.parametrize("spatial", [(9,), (3, 4, 5)])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("cl", [False, True])
def test_the_weight_gradient_matches_torch(spatial, k, cl):
    # Channels-last gradients: one product with the columns; channels-first (and frames in
    # other layouts): tcl_weight_grad, a product a frame and chunk of channels.
    torch.manual_seed(1)
    n = len(spatial)
    x = _laid(torch.randn(5, 3, *spatial, dtype=torch.float64), cl)
    w = torch.randn(8, 3, *(k,) * n, dtype=torch.float64)
    grad = _laid(torch.randn(5, 8, *spatial, dtype=torch.float64), cl)
    want = conv_same_weight_grad(grad, x, w, (2,) * n)
    for frames in (x, _laid(x, not cl)):
        got = native_conv.conv_weight_grad_small(grad.float(), frames.float(), w.float(),
                                                  (2,) * n)
        assert got.shape == w.shape and got.is_contiguous() and _rel(got, want) < 1e-5


def test_frames_with_gaps_between_samples_are_read_in_place():
    video = torch.randn(2, 5, 3, 10)  # (B, T, C, L): frame t is x[:, t], a gap per sample
    w = torch.randn(4, 3, 3)
    frame = video[:, 2]
    got = native_conv.conv_small(frame, None, w, None, (1,), False)
    assert _rel(got, conv_same(frame.double(), w.double(), (1,))) < 1e-5


def _args(**change):
    """A served conv_small call, with one argument changed."""
    args = dict(x=torch.randn(2, 3, 6), h=torch.randn(2, 4, 6), weight=torch.randn(8, 7, 3),
                bias=torch.randn(8), dilation=(1,), channels_last=False)
    args.update(change)
    return args


@pytest.mark.parametrize("change", [
    dict(x=torch.randn(2, 3, 6, 6), h=torch.randn(2, 4, 6, 6), weight=torch.randn(8, 7, 3, 3),
         dilation=(1, 1)),  # 2-d: torch's convolution
    dict(x=torch.randn(2, 3, 6, dtype=torch.float64)),
    dict(bias=torch.randn(8, dtype=torch.bfloat16)),
    dict(weight=torch.randn(8, 6, 3)),  # channels disagree
    dict(h=torch.randn(2, 4, 5)),  # sizes disagree
    dict(x=torch.randn(2, 3, 4096 + 1), h=None, weight=torch.randn(8, 3, 3)),  # too long
    dict(x=torch.randn(2, 3, 0), h=None, weight=torch.randn(8, 3, 3)),
    dict(dilation=(0,)), dict(dilation=(-1,)),
    dict(dilation=(100_000,)),  # a padded copy far larger than the columns
])
def test_calls_not_served_are_declined(change):
    assert native_conv.conv_small(**_args(**change)) is None


def test_pixels_at_one_stride_are_read_where_they_are():
    args = _args(x=torch.randn(2, 3, 12)[..., ::2])  # every other pixel
    want = conv_same(torch.cat([args["x"], args["h"]], 1).double(), args["weight"].double(),
                     (1,), args["bias"].double())
    assert _rel(native_conv.conv_small(**args), want) < 1e-5


def test_pixels_at_no_single_stride_are_declined():
    x = torch.randn(1, 2, 4, 5, 6).transpose(3, 4)  # (z, y, x) no longer in memory order
    assert native_conv.conv_small(x, None, torch.randn(4, 2, 3, 3, 3), None, (1, 1, 1),
                                  False) is None


def test_autograd_fake_tensors_and_a_turned_off_library_see_torch(monkeypatch):
    w = torch.randn(8, 7, 3, requires_grad=True)
    assert native_conv.conv_small(**_args(weight=w)) is None
    with torch.no_grad():
        assert native_conv.conv_small(**_args(weight=w)) is not None
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(2, 3, 6))
        assert native_conv.conv_small(**_args(x=fake)) is None
    monkeypatch.setattr(native_conv, "_library", lambda: None)
    assert native_conv.conv_small(**_args()) is None


@pytest.mark.parametrize(("cls", "spatial"), [(ConvLSTM1d, (12,)), (ConvLSTM3d, (3, 4, 5))])
def test_the_layer_gives_the_same_results_with_and_without_them(monkeypatch, cls, spatial):
    # (without the sgemm: the forward steps take the convolution, not native_step's one call)
    monkeypatch.setattr(native_build.library(), "has_sgemm", False)
    torch.manual_seed(2)
    model = cls(2, 4, 3, 2, batch_first=True, dilation=2)
    x = torch.randn(2, 3, 2, *spatial, requires_grad=True)
    served = {}

    def spy(name):
        fn = getattr(native_conv, name)

        def call(*args):
            out = fn(*args)
            served[name] = served.get(name, False) or out is not None
            return out

        return call

    for name in ("conv_small", "conv_input_grad_small", "conv_weight_grad_small"):
        monkeypatch.setattr(native_conv, name, spy(name))

    def run():
        out, state = model(x)
        (out[0].square().sum() + state[0][1].sum()).backward()
        grads = [x.grad.clone(), *(p.grad.clone() for p in model.parameters())]
        x.grad = None
        model.zero_grad()
        return [out[0].detach(), *grads]

    with_columns = run()
    # Every convolution of the forward and the input gradients; the weight gradient where
    # the frames are channels-last (1-d on CPU).
    assert served == {"conv_small": True, "conv_input_grad_small": True,
                      "conv_weight_grad_small": cls is ConvLSTM1d}
    monkeypatch.setattr(native_conv, "_library", lambda: None)
    for got, want in zip(with_columns, run()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_calls_past_the_columns_budget_are_left_to_torch(monkeypatch):
    monkeypatch.setattr(native_conv, "MAX_CALL_COLUMN_FLOATS", 2 * 21 * 6 - 1)  # < 2 frames'
    assert native_conv.conv_small(**_args()) is None
    grad, w = torch.randn(2, 8, 6), torch.randn(8, 7, 3)
    assert native_conv.conv_input_grad_small(grad, (2, 7, 6), w, (1,), False) is None


def test_chunks_of_frames_and_channels_give_the_same_results(monkeypatch):
    # Columns a chunk at a time (a training step's peak counts them): frames, and past one
    # frame's worth, channels, for the forward and both gradients.
    torch.manual_seed(6)
    x = _laid(torch.randn(5, 6, 4, 3, 5, dtype=torch.float64), False)
    w = torch.randn(8, 6, 3, 3, 3, dtype=torch.float64)
    grad = torch.randn(5, 8, 4, 3, 5, dtype=torch.float64)
    x1 = _laid(torch.randn(5, 6, 11, dtype=torch.float64), True)
    w1 = torch.randn(8, 6, 3, dtype=torch.float64)
    grad1 = _laid(torch.randn(5, 8, 11, dtype=torch.float64), True)
    wants = (conv_same(x, w, (1, 1, 1)), conv_same_input_grad(grad, x.shape, w, (1, 1, 1)),
             conv_same_weight_grad(grad1, x1, w1, (2,)),
             conv_same_weight_grad(grad, x, w, (1, 1, 1)))
    for chunk, sgemm in itertools.product((1, 27 * 60, 27 * 60 * 2 + 5, 1 << 16),
                                          (True, False)):  # one channel, frames, all
        monkeypatch.setattr(native_conv, "CHUNK_FLOATS", chunk)
        monkeypatch.setattr(native_conv, "_GRAD_PLANS", {})
        # (without the sgemm handed over, the input gradient's pieces run from Python; the
        # weight gradient of channels-first frames is torch's)
        monkeypatch.setattr(native_build.library(), "has_sgemm", sgemm)
        got = (native_conv.conv_small(x.float(), None, w.float(), None, (1, 1, 1), False),
               native_conv.conv_input_grad_small(grad.float(), x.shape, w.float(), (1, 1, 1),
                                                 True),
               native_conv.conv_weight_grad_small(grad1.float(), x1.float(), w1.float(), (2,)),
               native_conv.conv_weight_grad_small(grad.float(), x.float(), w.float(),
                                                  (1, 1, 1)))
        for g, want in zip(got, wants):
            assert (g is None) == (not sgemm and g is got[3]) and (
                g is None or _rel(g, want) < 1e-5), chunk


@pytest.mark.parametrize(("spatial", "c"), [((11,), 6), ((4, 3, 5), 6), ((6, 7), 3)])
@pytest.mark.parametrize("cl", [False, True])
def test_threads_share_the_gradients_pieces(monkeypatch, spatial, c, cl):
    # Three threads (the share threshold lowered to these frames), pieces of one or two
    # channels (of one frame for the input gradient, of all frames for the weight gradient),
    # so that threads take unequal numbers of pieces: each its own columns and padded copy,
    # its products on one BLAS thread.
    if not native_build.has_sgemm():
        pytest.skip("no sgemm handed over: the pieces run from Python")
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    monkeypatch.setattr(native_conv, "GRAD_THREAD_MACS", 1)
    try:
        torch.manual_seed(7)
        k = 3 if len(spatial) != 1 else 5
        dilation = (1,) * len(spatial)
        w = torch.randn(8, c, *(k,) * len(spatial), dtype=torch.float64)
        grad = _laid(torch.randn(5, 8, *spatial, dtype=torch.float64), cl)
        x = _laid(torch.randn(5, c, *spatial, dtype=torch.float64), cl)
        want_dx = conv_same_input_grad(grad, (5, c, *spatial), w, dilation)
        want_dw = conv_same_weight_grad(grad, x, w, dilation)
        for chunk in (1, 2 * k ** len(spatial) * math.prod(spatial)):  # one channel, two
            monkeypatch.setattr(native_conv, "CHUNK_FLOATS", chunk)
            monkeypatch.setattr(native_conv, "_GRAD_PLANS", {})
            dx = native_conv.conv_input_grad_small(grad.float(), (5, c, *spatial), w.float(),
                                                   dilation, cl)
            assert dx.shape == want_dx.shape and _rel(dx, want_dx) < 1e-5
            dw = native_conv.conv_weight_grad_small(grad.float(), x.float(), w.float(),
                                                    dilation)
            # (2-d frames: torch's weight gradient)
            assert (dw is None) == (len(spatial) == 2)
            assert dw is None or _rel(dw, want_dw) < 1e-5
            plans = {key[0]: found[0] for key, found in native_conv._GRAD_PLANS.items()}
            # (channels-last frames: the weight gradient is one product, from Python)
            assert set(plans) == {"input"} | (
                {"weight"} if not cl and len(spatial) != 2 else set())
            for kind, plan in plans.items():
                assert plan.chunk == (1 if chunk == 1 else min(c, 2))
                pieces = (5 if kind == "input" else 1) * -(-c // plan.chunk)
                assert plan.threads == (min(3, pieces) if native_build.parallel() else 1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("spatial", [(7,), (5, 6), (3, 4, 5)])
@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_1x1_input_gradient_is_one_product(spatial, cl, dtype):
    torch.manual_seed(3)
    grad = _laid(torch.randn(3, 8, *spatial, dtype=dtype), cl)
    w = torch.randn(8, 5, *(1,) * len(spatial), dtype=dtype)
    want = conv_same_input_grad(grad.double(), (3, 5, *spatial), w.double(), (1,) * len(spatial))
    dx = native_conv.pointwise_input_grad(grad, (3, 5, *spatial), w)
    assert dx.dtype == dtype and dx.shape == want.shape
    assert _rel(dx, want) < (1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert (dx.stride(1) == 1) == cl  # (channels-last where grad's frames are)
    # Larger kernels, other devices' or subclasses' tensors: the convolution's.
    assert native_conv.pointwise_input_grad(grad, (3, 5, *spatial),
                                            torch.randn(8, 5, *(3,) * len(spatial),
                                                        dtype=dtype)) is None
    assert native_conv.pointwise_input_grad(grad.to("meta"), (3, 5, *spatial),
                                            w.to("meta")) is None


def test_an_expanded_weight_is_read_where_it_is():
    # Rows 0 apart (one output channel's weights for all): the BLAS refuses such a leading
    # dimension, so the C pieces decline it and the Python loop reads it.
    grad = torch.randn(2, 4, 9)
    w = torch.randn(1, 3, 3).expand(4, 3, 3)
    want = conv_same_input_grad(grad.double(), (2, 3, 9), w.double(), (1,))
    dx = native_conv.conv_input_grad_small(grad, (2, 3, 9), w, (1,), False)
    assert _rel(dx, want) < 1e-5


def test_an_expanded_gradient_is_read_where_it_is():
    # The gradient of a sum: one value at every element (zero strides), which the BLAS's
    # leading dimensions cannot describe: the pieces' products run from Python.
    w = torch.randn(8, 6, 3, 3, 3, dtype=torch.float64)
    for grad in (torch.full((), 0.5).expand(2, 8, 3, 4, 5),
                 torch.randn(8, 1, 1, 1).expand(2, 8, 3, 4, 5)):
        want = conv_same_input_grad(grad.double(), (2, 6, 3, 4, 5), w, (1, 1, 1))
        dx = native_conv.conv_input_grad_small(grad, (2, 6, 3, 4, 5), w.float(), (1, 1, 1),
                                               False)
        assert _rel(dx, want) < 1e-5


def test_2d_frames_are_left_to_torch_but_input_gradients_of_few_channels():
    grad = torch.randn(4, 16, 7, 9)
    many = native_conv.GRAD_2D_MAX_CHANNELS + 1
    assert native_conv.conv_input_grad_small(grad, (4, many, 7, 9),
                                             torch.randn(16, many, 3, 3), (1, 1), False) is None
    assert native_conv.conv_small(torch.randn(4, 3, 7, 9), None, torch.randn(16, 3, 3, 3),
                                  None, (1, 1), False) is None
    assert native_conv.conv_weight_grad_small(
        _laid(grad, True), _laid(torch.randn(4, 3, 7, 9), True), torch.randn(16, 3, 3, 3),
        (1, 1)) is None


@pytest.mark.parametrize(("c", "k", "d", "cl_out"), [(1, 3, 1, True), (3, 3, 2, False),
                                                     (native_conv.GRAD_2D_MAX_CHANNELS, 2, 1,
                                                      True)])
def test_2d_input_gradients_of_few_channels_match_torch(c, k, d, cl_out):
    torch.manual_seed(2)
    w = torch.randn(12, c, k, k, dtype=torch.float64)
    grad = _laid(torch.randn(5, 12, 6, 7, dtype=torch.float64), True)
    want = conv_same_input_grad(grad, (5, c, 6, 7), w, (d, d))
    dx = native_conv.conv_input_grad_small(grad.float(), (5, c, 6, 7), w.float(), (d, d),
                                           cl_out)
    assert dx.shape == want.shape and _rel(dx, want) < 1e-5
    assert (dx.stride(1) == 1) == cl_out
