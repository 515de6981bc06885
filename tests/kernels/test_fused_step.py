"""The fused forward step (kernels/fused_step.py: convolution of [x_t, h] and gate update in one
Triton kernel) against the float64 oracle (tests/reference_fp64.py), alone and as the layer's
forward (ConvLSTM.fused_forward). On CPU in Triton's interpreter: tiny shapes."""

import pytest
import torch
from reference_fp64 import LayerParams, cell_step, conv_same, convlstm, params_from_module, rel_err
from triton_convlstm.kernels.fused_step import fused_step, pack_weight

from triton_convlstm import ConvLSTM, graphs

DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu), "cpu"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CASES = [  # (B, C, hidden, H, W, kernel, dilation, has_h, peephole, bias, channels_last)
    (2, 3, 5, 5, 6, (3, 3), (1, 1), True, True, True, True),
    (1, 3, 4, 6, 5, (2, 3), (2, 1), True, True, False, True),  # even kernels, dilation
    (1, 2, 3, 5, 4, (3, 2), (1, 2), True, True, True, True),
    (2, 2, 3, 4, 4, (3, 3), (1, 1), False, False, True, False),  # zero state, NCHW
    (1, 20, 18, 5, 3, (1, 1), (1, 1), True, False, True, True),  # one masked K slice
    (1, 70, 66, 3, 4, (3, 3), (1, 1), True, False, True, True),  # two K slices per segment
    (2, 3, 4, 9, 10, (3, 3), (1, 1), True, True, True, True),  # two pixel blocks per image
]


def _case_tensors(case, dtype, device):
    b, cin, hid, hh, ww, k, dil, has_h, peep, bias, cl = case
    fmt = torch.channels_last if cl else torch.contiguous_format
    g = torch.Generator().manual_seed(3)

    def r(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g)).to(device, dt)

    x = r(b, cin, hh, ww).contiguous(memory_format=fmt)
    h = r(b, hid, hh, ww).contiguous(memory_format=fmt) if has_h else None
    params = LayerParams(weight=r(4 * hid, cin + hid, *k, scale=0.3), bias=r(4 * hid) if bias
                         else None, peephole=r(3, hid) if peep else None, dilation=dil)
    c = r(b, hid, hh, ww, dt=torch.float32).contiguous(memory_format=fmt)
    return x, h, c, params, fmt


@pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:5])))
def test_fused_step_matches_the_oracle(case, dtype, device):
    x, h, c, p, fmt = _case_tensors(case, dtype, device)
    b, _, hid, hh, ww = case[:5]
    out = [torch.empty(b, ch, hh, ww, dtype=dt, device=device).contiguous(memory_format=fmt)
           for ch, dt in ((hid, dtype), (hid, torch.float32), (4 * hid, dtype))]
    fused_step(x, h, pack_weight(p.weight, x.shape[1]), p.bias, c, p.peephole, h_out=out[0],
               c_out=out[1], z_out=out[2], kernel=tuple(p.weight.shape[2:]), dilation=p.dilation)
    p64 = LayerParams(p.weight.double(), None if p.bias is None else p.bias.double(),
                      None if p.peephole is None else p.peephole.double(), p.dilation)
    h64 = torch.zeros_like(x[:, :1].expand(-1, hid, -1, -1), dtype=torch.float64) \
        if h is None else h.double()
    want_h, want_c = cell_step(x.double(), h64, c.double(), p64)
    want_z = conv_same(torch.cat([x.double(), h64], 1), p64.weight, p64.bias, p.dilation)
    for got, want in zip(out, (want_h, want_c, want_z)):
        assert rel_err(got, want) <= TOL[dtype]


def test_c_may_be_updated_in_place(device):
    x, h, c, p, fmt = _case_tensors(CASES[0], torch.float32, device)
    h_out = torch.empty_like(h)
    want = c.clone()
    fused_step(x, h, pack_weight(p.weight, 3), p.bias, want, p.peephole, h_out=h_out.clone(),
               c_out=torch.empty_like(c), kernel=(3, 3), dilation=(1, 1))
    fused_step(x, h, pack_weight(p.weight, 3), p.bias, c, p.peephole, h_out=h_out, c_out=c,
               kernel=(3, 3), dilation=(1, 1))
    expected = torch.empty_like(c)
    fused_step(x, h, pack_weight(p.weight, 3), p.bias, want, p.peephole,
               h_out=torch.empty_like(h), c_out=expected, kernel=(3, 3), dilation=(1, 1))
    torch.testing.assert_close(c, expected, rtol=0, atol=0)


def test_width_one_images_use_the_row_stride():
    """At W == 1 H and W merge with H's stride as the pixel stride (a state sliced from a wider
    buffer has stride_w != stride_h there)."""
    x, h, c, p, _ = _case_tensors((1, 3, 4, 5, 1, (3, 3), (1, 1), True, True, True, True),
                                  torch.float32, "cpu")
    wide = torch.randn(1, 4, 5, 3)  # c_prev: its first column, strides (60, 15, 3, 60)
    c_prev = torch.as_strided(wide, (1, 4, 5, 1), (60, 15, 3, 60))
    out_h, out_c = torch.empty_like(h), torch.empty(1, 4, 5, 1)
    fused_step(x, h, pack_weight(p.weight, 3), p.bias, c_prev, p.peephole, h_out=out_h,
               c_out=out_c, kernel=(3, 3), dilation=(1, 1))
    p64 = LayerParams(p.weight.double(), p.bias.double(), p.peephole.double(), (1, 1))
    want_h, want_c = cell_step(x.double(), h.double(), c_prev.double(), p64)
    assert rel_err(out_h, want_h) <= 1e-5 and rel_err(out_c, want_c) <= 1e-5


def test_images_past_int32_offsets_are_refused_and_the_layer_takes_the_split_path():
    from triton_convlstm.sequence import _fused_fits

    meta = dict(device="meta")
    big = (1, 3, 30000, 30000)
    kw = dict(kernel=(3, 3), dilation=(1, 1))
    with pytest.raises(ValueError, match="images of 2\\*\\*31"):
        fused_step(torch.empty(big, **meta), None, torch.empty(9 * 7, 16, **meta), None,
                   torch.empty(1, 4, 30000, 30000, **meta), None,
                   h_out=torch.empty(1, 4, 30000, 30000, **meta),
                   c_out=torch.empty(1, 4, 30000, 30000, **meta), **kw)
    weight = torch.empty(16, 7, 3, 3, **meta)
    assert _fused_fits(torch.empty(2, *big, **meta), weight) is False
    assert _fused_fits(torch.empty(2, 1, 3, 64, 64, **meta), weight) is True


def test_weights_past_int32_offsets_are_refused_and_the_layer_takes_the_split_path():
    from triton_convlstm.sequence import _fused_fits

    meta = dict(device="meta")
    hid, cin = 2400, 2400  # 7x7: 49 * 4800 * 9600 weight elements, past 2**31
    state = torch.empty(1, hid, 4, 4, **meta)
    with pytest.raises(ValueError, match="w_packed: weights of 2\\*\\*31"):
        fused_step(torch.empty(1, cin, 4, 4, **meta), None,
                   torch.empty(49 * (cin + hid), 4 * hid, **meta), None, state, None,
                   h_out=torch.empty_like(state), c_out=torch.empty_like(state),
                   kernel=(7, 7), dilation=(1, 1))
    x = torch.empty(1, 1, cin, 4, 4, **meta)
    assert _fused_fits(x, torch.empty(4 * hid, cin + hid, 7, 7, **meta)) is False
    assert _fused_fits(x, torch.empty(4 * hid, cin + hid, 3, 3, **meta)) is True


@pytest.mark.gpu
def test_fp32_with_tf32_dots_stays_close(monkeypatch):
    """cuDNN's default (allow_tf32) switches the fp32 dots to TF32: looser, still close."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    x, h, c, p, fmt = _case_tensors(CASES[0], torch.float32, "cuda")
    h_out, c_out = torch.empty_like(h), torch.empty_like(c)
    fused_step(x, h, pack_weight(p.weight, 3), p.bias, c, p.peephole, h_out=h_out,
               c_out=c_out, kernel=(3, 3), dilation=(1, 1))
    p64 = LayerParams(p.weight.double(), p.bias.double(), p.peephole.double(), (1, 1))
    want_h, want_c = cell_step(x.double(), h.double(), c.double(), p64)
    assert rel_err(h_out, want_h) <= 5e-3 and rel_err(c_out, want_c) <= 5e-3


def test_a_second_backward_reruns_the_fused_forward(device):
    """retain_graph: the first backward overwrote the saved gates, so the second reruns the
    forward; it must be the fused one again (same rounding): identical gradients."""
    torch.manual_seed(6)
    m = ConvLSTM(3, 4, 3, 1, batch_first=True, backend="triton", cuda_graphs=False).to(device)
    m.fused_forward = True
    x = torch.randn(1, 3, 3, 5, 5, device=device, requires_grad=True)
    loss = (m(x)[0][0] ** 2).sum()
    first = torch.autograd.grad(loss, [x, *m.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *m.parameters()])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_arguments_raise():
    x, h, c, p, _ = _case_tensors(CASES[0], torch.float32, "cpu")
    w = pack_weight(p.weight, 3)
    ok = dict(h_out=torch.empty_like(h), c_out=torch.empty_like(c), kernel=(3, 3),
              dilation=(1, 1))
    with pytest.raises(ValueError, match="w_packed: expected shape"):
        fused_step(x, h, w[:-1], p.bias, c, None, **ok)
    with pytest.raises(ValueError, match="w_packed: expected a contiguous"):
        fused_step(x, h, w.t().contiguous().t(), p.bias, c, None, **ok)
    with pytest.raises(TypeError, match="h_prev: expected dtype"):
        fused_step(x, h.double(), w, p.bias, c, None, **ok)
    with pytest.raises(TypeError, match="c_prev: expected dtype"):
        fused_step(x, h, w, p.bias, c.double(), None, **ok)


@pytest.mark.parametrize("use_graphs", [False, True], ids=["eager", "graphs"])
def test_layer_with_the_fused_forward_matches_the_oracle(monkeypatch, use_graphs, device):
    """Outputs, final states and every gradient of a 2-layer model (peepholes, an even kernel,
    dilation, a given initial state) with fused_forward on: the backward is the split path's,
    reading what the fused forward saved."""
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", use_graphs)  # on CPU; real ones on CUDA
    graphs.clear()
    torch.manual_seed(4)
    m = ConvLSTM(3, [5, 4], [3, (2, 3)], 2, batch_first=True, peephole=True,
                 return_all_layers=True, dilation=[1, 2], backend="triton",
                 cuda_graphs=use_graphs).to(device)
    with torch.no_grad():
        for cell in m.cell_list:
            cell.peephole.normal_(0, 0.5)
    m.fused_forward = True
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 3, 6, 5, generator=g).to(device)
    state = [tuple(torch.randn(2, hid, 6, 5, generator=g).to(device) for _ in "hc")
             for hid in (5, 4)]

    def run(model, x, state, params):
        x = x.clone().requires_grad_()
        state = [tuple(t.clone().requires_grad_() for t in pair) for pair in state]
        outs, last = model(x, state)
        flat = [*outs, *(t for pair in last for t in pair)]
        loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype,
                                       device=t.device).view_as(t)).sum() for t in flat)
        wrt = [x, *(t for pair in state for t in pair), *params]
        return flat + list(torch.autograd.grad(loss, wrt))

    for _ in range(3 if use_graphs else 1):  # the third call replays captured loops
        got = run(m, x, state, list(m.parameters()))
    layers = params_from_module(m, 2, dilation=[1, 2])
    params64 = [getattr(layers[int(name.split(".")[1])], name.rsplit(".", 1)[1])
                for name, _ in m.named_parameters()]  # the module's order

    def oracle(x, state):
        outs, last = convlstm(x, layers, state)
        return outs, last

    want = run(oracle, x.double(), [tuple(t.double() for t in pair) for pair in state],
               params64)
    graphs.clear()
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


def test_fused_forward_is_off_by_default_and_ignored_on_the_torch_path():
    m = ConvLSTM(3, 4, 3, 1, batch_first=True, backend="torch")
    assert m.fused_forward is False
    x = torch.randn(1, 2, 3, 4, 4)
    with torch.no_grad():
        want = m(x)[0][0]
        m.fused_forward = True
        torch.testing.assert_close(m(x)[0][0], want, rtol=0, atol=0)
