"""ConvLSTMCell (one time step) against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from reference_fp64 import cell_step, params_from_cell, rel_err

from triton_convlstm import ConvLSTMCell

TOL = 1e-5

CASES = [
    # (B, C, hidden, kernel, H, W, bias, peephole, dilation)
    (2, 5, 7, 3, 5, 6, True, False, 1),
    (2, 5, 7, 3, 5, 6, True, True, 1),
    (1, 3, 4, 3, 4, 5, False, False, 1),
    (1, 3, 4, 3, 4, 5, False, True, 1),
    (3, 1, 1, 1, 1, 1, True, True, 1),
    (2, 3, 5, 2, 5, 4, True, True, 1),
    (1, 2, 3, (2, 3), 6, 5, True, False, 1),
    (1, 2, 3, (3, 5), 6, 7, True, True, 2),
]


def case_id(c):
    b, ch, hid, k, h, w, bias, peep, dil = c
    k = "x".join(map(str, k)) if isinstance(k, tuple) else k
    s = f"B{b}-C{ch}-hid{hid}-k{k}-{h}x{w}"
    s += "" if bias else "-nobias"
    s += "-peep" if peep else ""
    s += f"-dil{dil}" if dil != 1 else ""
    return s


def make_cell(c, dtype=torch.float32, backend="torch"):
    b, ch, hid, k, h, w, bias, peep, dil = c
    cell = ConvLSTMCell(ch, hid, k, bias, peephole=peep, dilation=dil, backend=backend)
    if peep:
        with torch.no_grad():
            cell.peephole.normal_()
    return cell.to(dtype)


@pytest.mark.parametrize("c", CASES, ids=[case_id(c) for c in CASES])
def test_cell_vs_oracle(c):
    b, ch, hid, k, hh, ww, bias, peep, dil = c
    torch.manual_seed(2)
    cell = make_cell(c)
    names = {n for n, _ in cell.named_parameters()}
    assert names == {"conv.weight"} | ({"conv.bias"} if bias else set()) | (
        {"peephole"} if peep else set())
    kh, kw = k if isinstance(k, tuple) else (k, k)
    assert cell.conv.weight.shape == (4 * hid, ch + hid, kh, kw)
    if bias:
        assert cell.conv.bias.shape == (4 * hid,)
    else:
        assert getattr(cell.conv, "bias", None) is None
    if peep:
        assert cell.peephole.shape == (3, hid)

    x64 = torch.randn(b, ch, hh, ww, dtype=torch.float64)
    h64 = 0.5 * torch.randn(b, hid, hh, ww, dtype=torch.float64)
    c64 = torch.randn(b, hid, hh, ww, dtype=torch.float64)
    x, h0, c0 = (t.float().requires_grad_(True) for t in (x64, h64, c64))
    h, cn = cell(x, (h0, c0))
    assert h.shape == cn.shape == (b, hid, hh, ww)
    assert h.dtype == cn.dtype == torch.float32

    p = params_from_cell(cell, dil)
    xo, ho, co = (t.clone().requires_grad_(True) for t in (x64, h64, c64))
    hr, cr = cell_step(xo, ho, co, p)
    assert rel_err(h, hr) <= TOL
    assert rel_err(cn, cr) <= TOL

    wh, wc = torch.randn_like(h64), torch.randn_like(c64)
    params = [prm for _, prm in cell.named_parameters()]
    g = torch.autograd.grad((h * wh.float()).sum() + (cn * wc.float()).sum(),
                            [x, h0, c0, *params])
    ref_params = {"conv.weight": p.weight, "conv.bias": p.bias, "peephole": p.peephole}
    gr = torch.autograd.grad((hr * wh).sum() + (cr * wc).sum(),
                             [xo, ho, co, *[ref_params[n] for n, _ in cell.named_parameters()]])
    labels = ["x", "h", "c", *[n for n, _ in cell.named_parameters()]]
    for lab, a, r in zip(labels, g, gr):
        assert rel_err(a, r) <= TOL, f"grad {lab}: {rel_err(a, r):.3g}"


def test_cell_gradcheck_float64():
    c = (1, 2, 2, 2, 3, 3, True, True, 1)
    cell = make_cell(c, dtype=torch.float64)
    names = [n for n, _ in cell.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in cell.named_parameters()]
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    cc = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, h, cc, *ps):
        return torch.func.functional_call(cell, dict(zip(names, ps)), (x, (h, cc)))

    assert torch.autograd.gradcheck(f, (x, h, cc, *params), eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_init_hidden(dtype):
    cell = ConvLSTMCell(3, 5, 3, backend="torch").to(dtype)
    h, c = cell.init_hidden(2, (4, 7))
    assert h.shape == c.shape == (2, 5, 4, 7)
    assert h.device == c.device == cell.conv.weight.device
    assert not h.any() and not c.any()
    # h in the parameters' dtype, c in the state dtype (float32 unless float64)
    assert h.dtype == cell.conv.weight.dtype == dtype
    assert c.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # the zeros work as a state: the step runs with them, c comes back in the state dtype
    x = torch.randn(2, 3, 4, 7).to(dtype)
    state = (h.to(dtype), c.to(torch.float64 if dtype == torch.float64 else torch.float32))
    hn, cn = cell(x, state)
    assert hn.dtype == dtype
    assert cn.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool(torch.isfinite(hn).all()) and bool(torch.isfinite(cn).all())


def test_init_hidden_state_is_accepted_as_returned():
    """What init_hidden returns must be accepted by forward as is (the popular module's usage)."""
    for dtype in (torch.float32, torch.bfloat16):
        cell = ConvLSTMCell(3, 5, 3, backend="torch").to(dtype)
        x = torch.randn(2, 3, 4, 7).to(dtype)
        h, c = cell(x, cell.init_hidden(2, (4, 7)))
        assert h.dtype == dtype


# (h, c) limits against the float64 oracle, about 5x the largest error measured
HALF_TOL = {torch.bfloat16: (1e-2, 4e-3), torch.float16: (1.5e-3, 5e-4)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cell_half_precision(dtype):
    c = (2, 3, 4, 3, 5, 6, True, True, 1)
    cell = make_cell(c, dtype=dtype)
    x = torch.randn(2, 3, 5, 6).to(dtype)
    h0 = torch.randn(2, 4, 5, 6).to(dtype)
    c0 = torch.randn(2, 4, 5, 6)
    h, cn = cell(x, (h0, c0))
    assert h.dtype == dtype and cn.dtype == torch.float32
    p = params_from_cell(cell)
    hr, cr = cell_step(x.double(), h0.double(), c0.double(), p)
    # measured max over 200 seeds: bf16 h 2.1e-3, c 6.7e-4; fp16 h 2.7e-4, c 8.4e-5
    h_tol, c_tol = HALF_TOL[dtype]
    assert rel_err(h, hr) <= h_tol, rel_err(h, hr)
    assert rel_err(cn, cr) <= c_tol, rel_err(cn, cr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("peep", [False, True], ids=["plain", "peep"])
def test_default_state_is_exact_zeros(dtype, peep):
    """cell(x) with no state is exactly cell(x, (zeros, zeros))."""
    cell = make_cell((2, 3, 4, 3, 5, 6, True, peep, 1), dtype=dtype)
    x = torch.randn(2, 3, 5, 6).to(dtype)
    c_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    zeros = (torch.zeros(2, 4, 5, 6, dtype=dtype), torch.zeros(2, 4, 5, 6, dtype=c_dtype))
    h1, c1 = cell(x)
    h2, c2 = cell(x, zeros)
    h3, c3 = cell(x, cur_state=None)
    assert h1.dtype == h2.dtype == dtype and c1.dtype == c2.dtype == c_dtype
    assert torch.equal(h1, h2) and torch.equal(c1, c2)
    assert torch.equal(h1, h3) and torch.equal(c1, c3)


def test_cell_matches_layer_single_step():
    """A ConvLSTM layer with T=1 and the cell with the same weights agree."""
    from triton_convlstm import ConvLSTM

    m = ConvLSTM(3, 4, 3, 1, batch_first=True, peephole=True, backend="torch")
    with torch.no_grad():
        m.cell_list[0].peephole.normal_()
    cell = ConvLSTMCell(3, 4, 3, peephole=True, backend="torch")
    cell.load_state_dict(m.cell_list[0].state_dict())
    x = torch.randn(2, 1, 3, 5, 5)
    st = (torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5))
    outs, lasts = m(x, [st])
    h, c = cell(x[:, 0], st)
    assert rel_err(h, lasts[0][0]) <= 1e-6
    assert rel_err(c, lasts[0][1]) <= 1e-6


@pytest.mark.parametrize("c", [(1, 2, 3, 3, 5, 6, True, True, 1)], ids=["B1-C2-hid3-peep"])
def test_cell_triton_matches_torch(c):
    torch.manual_seed(4)
    ct = make_cell(c, backend="torch")
    cr = make_cell(c, backend="triton")
    cr.load_state_dict(ct.state_dict())
    x = torch.randn(1, 2, 5, 6)
    st = (torch.randn(1, 3, 5, 6), torch.randn(1, 3, 5, 6))
    a = ct(x, st)
    b = cr(x, st)
    assert rel_err(b[0], a[0]) <= 1e-5 and rel_err(b[1], a[1]) <= 1e-5
