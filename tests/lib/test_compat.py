"""Drop-in compatibility with the popular ConvLSTM (ndrplz/ConvLSTM_pytorch style).

A copy of that module is in tests/popular_convlstm.py; state_dicts must load both ways with
strict=True, and the two must compute the same thing.
"""

from __future__ import annotations

import math

import pytest
import torch
from popular_convlstm import PopularConvLSTM
from torch import nn

import triton_convlstm
from triton_convlstm import ConvLSTM


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (input_dim, hidden_dim, kernel_size, num_layers, batch_first, bias, return_all_layers)
CONFIGS = [
    (3, 8, (3, 3), 1, True, True, False),
    (3, 8, (3, 3), 1, False, True, False),
    (2, [4, 6], [(3, 3), (5, 5)], 2, True, True, True),
    (2, [4, 6], [(3, 3), (5, 5)], 2, False, False, False),
    (5, [3, 4, 2], [(1, 1), (3, 5), (5, 3)], 3, True, True, True),
    (5, [3, 4, 2], [(1, 1), (3, 5), (5, 3)], 3, True, False, False),
]


def cfg_id(c):
    ind, hid, k, n, bf, bias, ral = c
    hid = hid if isinstance(hid, int) else ",".join(map(str, hid))
    k = [k] if isinstance(k, tuple) else k
    ks = ",".join("x".join(map(str, e)) for e in k)
    return (f"in{ind}-hid{hid}-k{ks}-L{n}-{'BT' if bf else 'TB'}"
            f"{'' if bias else '-nobias'}{'-all' if ral else ''}")


def shape_of(c, b=2, t=3, hh=5, ww=6):
    ind, _, _, _, bf, _, _ = c
    return (b, t, ind, hh, ww) if bf else (t, b, ind, hh, ww)


def ours_from(c, **kw):
    ind, hid, k, n, bf, bias, ral = c
    return ConvLSTM(ind, hid, k, n, batch_first=bf, bias=bias, return_all_layers=ral,
                    backend="torch", **kw)


def check_same_results(theirs, ours, x):
    lo_t, ls_t = theirs(x)
    lo_o, ls_o = ours(x)
    assert isinstance(lo_o, list) and isinstance(ls_o, list)
    assert len(lo_o) == len(lo_t) and len(ls_o) == len(ls_t)
    for a, b in zip(lo_o, lo_t):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel(a, b) <= 1e-5
    for so, st in zip(ls_o, ls_t):
        assert len(so) == 2
        ho, co = so  # unpacks like the popular module's [h, c]
        assert ho.shape == st[0].shape and co.shape == st[1].shape
        assert rel(ho, st[0]) <= 1e-5 and rel(co, st[1]) <= 1e-5


@pytest.mark.parametrize("c", CONFIGS, ids=[cfg_id(c) for c in CONFIGS])
def test_theirs_loads_into_ours(c):
    torch.manual_seed(11)
    theirs = PopularConvLSTM(*c)
    ours = ours_from(c)
    sd_t = theirs.state_dict()
    sd_o = ours.state_dict()
    assert list(sd_o.keys()) == list(sd_t.keys())
    for key in sd_t:
        assert sd_o[key].shape == sd_t[key].shape, key
        assert sd_o[key].dtype == sd_t[key].dtype, key
    ours.load_state_dict(sd_t, strict=True)
    check_same_results(theirs, ours, torch.randn(shape_of(c)))


@pytest.mark.parametrize("c", CONFIGS[::2], ids=[cfg_id(c) for c in CONFIGS[::2]])
def test_ours_loads_into_theirs(c):
    torch.manual_seed(12)
    ours = ours_from(c)
    theirs = PopularConvLSTM(*c)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    check_same_results(theirs, ours, torch.randn(shape_of(c)))


def test_int_kernel_matches_tuple_kernel():
    """Ours also takes an int kernel_size (the popular module insists on tuples)."""
    torch.manual_seed(13)
    theirs = PopularConvLSTM(3, [4, 5], (3, 3), 2, batch_first=True)
    ours = ConvLSTM(3, [4, 5], 3, 2, batch_first=True, backend="torch")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    check_same_results(theirs, ours, torch.randn(2, 3, 3, 5, 4))


def test_return_structure_matches():
    torch.manual_seed(14)
    for ral in (False, True):
        theirs = PopularConvLSTM(2, [3, 4, 5], (3, 3), 3, True, True, ral)
        ours = ConvLSTM(2, [3, 4, 5], 3, 3, True, True, ral, backend="torch")
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(1, 2, 2, 4, 4)
        lo_t, ls_t = theirs(x)
        lo_o, ls_o = ours(x)
        assert type(lo_o) is list and type(ls_o) is list
        assert len(lo_o) == len(lo_t) == (3 if ral else 1)
        assert len(ls_o) == len(ls_t)
        for pair in ls_o:
            assert isinstance(pair, (tuple, list)) and len(pair) == 2
            h, c = pair
            assert isinstance(h, torch.Tensor) and isinstance(c, torch.Tensor)
        for a, b in zip(lo_o, lo_t):
            assert a.shape == b.shape


def test_popular_calling_conventions():
    """Positional arguments in the popular order, and the popular keyword names."""
    ours = ConvLSTM(input_dim=3, hidden_dim=4, kernel_size=(3, 3), num_layers=1,
                    batch_first=True, bias=True, return_all_layers=False)
    x = torch.randn(1, 2, 3, 4, 4)
    outs, lasts = ours(x, None)
    assert outs[0].shape == (1, 2, 4, 4, 4)
    outs2, _ = ours(x, hidden_state=None)
    assert torch.equal(outs[0], outs2[0])
    # the popular module's attributes
    assert len(ours.cell_list) == 1
    assert isinstance(ours.cell_list, nn.ModuleList)


def test_popular_keyword_names_and_helpers():
    """Code written against the popular module calls forward with its argument names, reads
    the cells' padding and builds zero states with _init_hidden."""
    torch.manual_seed(15)
    theirs = PopularConvLSTM(3, [4, 2], [(3, 3), (5, 3)], 2, True, True, True)
    ours = ConvLSTM(3, [4, 2], [(3, 3), (5, 3)], 2, True, True, True, backend="torch")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 3, 6, 5)
    by_keyword, _ = ours(input_tensor=x, hidden_state=None)
    torch.testing.assert_close(by_keyword[-1], theirs(input_tensor=x)[0][-1])
    states = ours._init_hidden(batch_size=2, image_size=(6, 5))
    want = theirs._init_hidden(batch_size=2, image_size=(6, 5))
    assert [tuple(t.shape) for p in states for t in p] == [tuple(t.shape) for p in want for t in p]
    assert all(not t.any() for p in states for t in p)
    torch.testing.assert_close(ours(x, states)[0][-1], by_keyword[-1])
    for mine, popular in zip(ours.cell_list, theirs.cell_list):
        assert mine.padding == popular.padding
        h, c = mine(input_tensor=x[:, 0] if mine.input_dim == 3 else by_keyword[0][:, 0],
                    cur_state=mine.init_hidden(2, (6, 5)))
        assert h.shape == (2, mine.hidden_dim, 6, 5)


def test_same_seed_same_init():
    """Construction draws the parameters exactly as the popular module does (nn.Conv2d's init in
    the same order), so the same seed gives identical state_dicts."""
    c = (3, [4, 6], [(3, 3), (5, 5)], 2, True, True, False)
    torch.manual_seed(123)
    theirs = PopularConvLSTM(*c)
    torch.manual_seed(123)
    ours = ours_from(c)
    sd_t, sd_o = theirs.state_dict(), ours.state_dict()
    for k in sd_t:
        assert torch.equal(sd_t[k], sd_o[k]), k


def test_default_init_statistics_match_conv2d():
    """Without relying on equal draws: weight and bias follow nn.Conv2d's default init
    (kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both)."""
    torch.manual_seed(0)
    ind, hid, k = 16, 32, 3
    m = ConvLSTM(ind, hid, k, 1, backend="torch")
    w, b = m.cell_list[0].conv.weight, m.cell_list[0].conv.bias
    fan_in = (ind + hid) * k * k
    bound = 1 / math.sqrt(fan_in)
    sd = bound / math.sqrt(3)  # std of U(-bound, bound)
    # (tensor, relative tolerance on its std, tolerance on its mean in units of bound)
    for t, std_tol, mean_tol in ((w, 0.03, 0.02), (b, 0.25, 0.3)):
        t = t.detach()
        assert t.abs().max() <= bound * (1 + 1e-6)
        assert t.abs().max() >= 0.9 * bound  # uniform over the whole interval, not narrower
        assert abs(t.std().item() - sd) <= std_tol * sd
        assert abs(t.mean().item()) <= mean_tol * bound


@pytest.mark.parametrize("fb", [1.0, -0.5], ids=["fb1", "fb-0.5"])
def test_forget_bias_shifts_only_f_gate(fb):
    hid = 5
    torch.manual_seed(21)
    m0 = ConvLSTM(3, [hid, 4], 3, 2, forget_bias=0.0, backend="torch")
    torch.manual_seed(21)
    m1 = ConvLSTM(3, [hid, 4], 3, 2, forget_bias=fb, backend="torch")
    for layer, hd in enumerate((hid, 4)):
        b0 = m0.cell_list[layer].conv.bias.detach()
        b1 = m1.cell_list[layer].conv.bias.detach()
        assert b1.shape == (4 * hd,)
        diff = b1 - b0
        expect = torch.zeros(4 * hd)
        expect[hd:2 * hd] = fb
        torch.testing.assert_close(diff, expect, rtol=0, atol=1e-6)
        assert torch.equal(m0.cell_list[layer].conv.weight, m1.cell_list[layer].conv.weight)


@pytest.mark.parametrize("fb", [1.0, -0.5, 2], ids=["1.0", "-0.5", "int2"])
def test_forget_bias_without_bias(fb):
    """bias=False has no bias to shift: a non-zero forget_bias raises ValueError."""
    with pytest.raises(ValueError,
                       match=rf"^forget_bias: expected 0\.0 with bias=False, got {fb}$"):
        ConvLSTM(3, 4, 3, 1, bias=False, forget_bias=fb, backend="torch")
    # zero is no shift: accepted, and there is no bias
    m = ConvLSTM(3, 4, 3, 1, bias=False, forget_bias=0.0, backend="torch")
    assert all(not k.endswith("bias") for k in m.state_dict())


@pytest.mark.parametrize("fb", [True, False, "1.0", None, [1.0], torch.tensor(1.0)],
                         ids=["True", "False", "str", "None", "list", "tensor"])
def test_forget_bias_must_be_a_number(fb):
    with pytest.raises(TypeError, match=r"^forget_bias: expected a number, got "):
        ConvLSTM(3, 4, 3, 1, forget_bias=fb, backend="torch")


def test_peephole_state_dict_extra_key():
    m = ConvLSTM(3, [4, 5], 3, 2, peephole=True, backend="torch")
    keys = list(m.state_dict())
    for layer, hd in enumerate((4, 5)):
        assert f"cell_list.{layer}.peephole" in keys
        assert m.state_dict()[f"cell_list.{layer}.peephole"].shape == (3, hd)
    # a non-peephole checkpoint does not load strictly into a peephole model, but loads with
    # strict=False leaving the peepholes alone
    plain = PopularConvLSTM(3, [4, 5], (3, 3), 2)
    with pytest.raises(RuntimeError, match="peephole"):
        m.load_state_dict(plain.state_dict(), strict=True)
    res = m.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ["cell_list.0.peephole", "cell_list.1.peephole"]


def test_public_api():
    assert set(triton_convlstm.__all__) >= {"ConvLSTM", "ConvLSTMCell"}
    assert issubclass(ConvLSTM, nn.Module)
