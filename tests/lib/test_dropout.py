"""Variational dropout (Gal & Ghahramani 2016, as Keras' ConvLSTM): ``dropout`` and
``recurrent_dropout``, one rate or one per layer. In training, every call draws, per layer and
direction, an input mask (B, C_in, *spatial) on x and a recurrent mask (B, hidden, *spatial) on
the h the recurrent convolution reads, the same at every step; the h returned is not masked.

The masks are drawn through ``triton_convlstm.dropout.dropout_mask``: a spy records them, and
the float64 oracle (tests/reference_fp64.py), given the same masks, must agree on the outputs,
the final states and every gradient. Also: nothing in eval mode or at p = 0, the expectation
kept, fresh masks at every call (captured graphs too, emulated on CPU), seeds reproduce, the
per-layer rates, and the errors."""

from __future__ import annotations

import pytest
import torch
from family_oracle import DILATIONS, HIDDEN, LAYERS, SIZES, check_against_oracle
from family_oracle import family_model as _model
from family_oracle import loss as _loss
from family_oracle import oracle_params as _oracle_params
from family_oracle import sequence_inputs as _inputs
from reference_fp64 import convlstm, rel_err

import triton_convlstm.dropout as tdropout
from triton_convlstm import graphs


@pytest.fixture
def drawn(monkeypatch):
    """Every mask the model draws, in order: (p, channels, mask) per call of dropout_mask."""
    calls, real = [], tdropout.dropout_mask

    def spy(*args, **kwargs):
        mask = real(*args, **kwargs)
        p = kwargs["p"] if "p" in kwargs else args[0]
        channels = kwargs["channels"] if "channels" in kwargs else args[2]
        calls.append((p, channels, mask))
        return mask

    monkeypatch.setattr(tdropout, "dropout_mask", spy)
    return calls


def _rates(v, layers=2):
    return list(v) if isinstance(v, (list, tuple)) else [v] * layers


def _oracle_masks(records, dropout, recurrent_dropout, bidirectional, layers=2):
    """The recorded masks of one call as the oracle takes them (one tuple of (input, recurrent)
    per direction per layer), in the documented order of the draws: per layer, per direction
    (forward first), the input mask if dropout > 0, then the recurrent one if
    recurrent_dropout > 0. Every record of the call is consumed."""
    records = list(records)
    masks = []
    for p_in, p_rec in zip(_rates(dropout, layers), _rates(recurrent_dropout, layers)):
        per_dir = []
        for _ in range(2 if bidirectional else 1):
            pair = []
            for p in (p_in, p_rec):
                if p > 0:
                    got_p, _, mask = records.pop(0)
                    assert got_p == p
                    pair.append(mask.detach().cpu())
                else:
                    pair.append(None)
            per_dir.append(tuple(pair))
        masks.append(tuple(per_dir))
    assert not records, f"{len(records)} more masks drawn than the rates ask for"
    return masks


def _check_against_oracle(m, n, x, state, masks, tol, outs, states, lengths=None,
                          dilation=DILATIONS, grads=True):
    """outs, states: the model's from x and state; masks: the oracle's (from the spy)."""
    check_against_oracle(m, n, x, state, tol, outs=outs, states=states, lengths=lengths,
                         masks=masks, dilation=dilation, grads=grads)


# ---------------------------------------------------------------------------------------------
# Against the oracle, with the masks the model drew


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_training_matches_the_oracle_with_the_drawn_masks(n, bidirectional, drawn):
    m = _model(n, bidirectional, dropout=0.3, recurrent_dropout=0.4).train()
    x, state = _inputs(m, n, 2, 3)
    outs, states = m(x, state)
    dirs = 2 if bidirectional else 1
    assert len(drawn) == 2 * 2 * dirs
    masks = _oracle_masks(drawn, 0.3, 0.4, bidirectional)
    for li, layer in enumerate(masks):
        c_in = 2 if li == 0 else dirs * HIDDEN[li - 1]
        for mx, mh in layer:
            assert mx.shape == (2, c_in, *SIZES[n]) and mh.shape == (2, HIDDEN[li], *SIZES[n])
            assert mx.dtype == mh.dtype == torch.float64
            assert (mx == 0).any() and (mx != 0).any() and (mh == 0).any() and (mh != 0).any()
    _check_against_oracle(m, n, x, state, masks, 1e-9, outs, states)


def test_the_masks_matter():
    """The oracle checks are not vacuous: without the masks the outputs are others."""
    m = _model(2, dropout=0.5, recurrent_dropout=0.5).train()
    x, _ = _inputs(m, 2, 2, 3, with_state=False)
    outs, _ = m(x)
    fwd, _ = _oracle_params(m, 2)
    plain, _ = convlstm(x.detach(), fwd)
    assert rel_err(outs[-1], plain[-1]) > 1e-3


def test_triton_backend_matches_the_oracle(drawn):
    m = _model(2, backend="triton", dtype=torch.float32, dropout=0.5,
               recurrent_dropout=0.25).train()
    x, state = _inputs(m, 2, 2, 3, dtype=torch.float32)
    outs, states = m(x, state)
    masks = _oracle_masks(drawn, 0.5, 0.25, False)
    assert all(mk.dtype == torch.float32 for layer in masks for pair in layer for mk in pair)
    _check_against_oracle(m, 2, x, state, masks, 1e-5, outs, states)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_dropout_with_lengths_matches_the_oracle(bidirectional, drawn):
    """The two features together: each sample's masks over its own steps."""
    m = _model(1, bidirectional, dropout=0.3, recurrent_dropout=0.3).train()
    x, state = _inputs(m, 1, 3, 4)
    lengths = [2, 4, 1]
    outs, states = m(x, state, lengths=lengths)
    masks = _oracle_masks(drawn, 0.3, 0.3, bidirectional)
    _check_against_oracle(m, 1, x, state, masks, 1e-9, outs, states, lengths=lengths)
    for b, length in enumerate(lengths):
        assert all((o[b, length:] == 0).all() for o in outs)
        assert (x.grad[b, length:] == 0).all()


# ---------------------------------------------------------------------------------------------
# When masks are drawn


def test_eval_mode_equals_the_model_without_dropout(drawn):
    m = _model(1, True, dropout=0.5, recurrent_dropout=0.5).eval()
    plain = _model(1, True)
    plain.load_state_dict(m.state_dict())
    x, state = _inputs(m, 1, 2, 3)
    got, got_states = m(x, state)
    want, want_states = plain(x, state)
    assert not drawn
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for (h1, c1), (h2, c2) in zip(got_states, want_states):
        assert torch.equal(h1, h2) and torch.equal(c1, c2)


def test_rate_zero_draws_nothing_in_training(drawn):
    m = _model(2, True, dropout=0.0, recurrent_dropout=[0, 0]).train()
    x, _ = _inputs(m, 2, 2, 3, with_state=False)
    got, _ = m(x)
    assert not drawn
    want, _ = m.eval()(x)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("dropout", "recurrent_dropout", "expected"), [
    ([0.5, 0.0], 0.0, [(0, "input")]),
    (0.0, [0.0, 0.3], [(1, "recurrent")]),
    ([0.5, 0.0], [0.0, 0.3], [(0, "input"), (1, "recurrent")]),
    ([0.2, 0.1], [0.3, 0.4], [(0, "input"), (0, "recurrent"), (1, "input"), (1, "recurrent")]),
])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_per_layer_rates_draw_only_where_positive(dropout, recurrent_dropout, expected,
                                                  bidirectional, drawn):
    """The draws, in order: per layer, per direction, the input mask then the recurrent one,
    each where its rate is above 0, with that rate and that layer's channels."""
    m = _model(1, bidirectional, dropout=dropout, recurrent_dropout=recurrent_dropout).train()
    x, _ = _inputs(m, 1, 2, 3, with_state=False)
    m(x)
    dirs = 2 if bidirectional else 1
    want = []
    for layer in range(2):
        for _ in range(dirs):
            for li, kind in expected:
                if li == layer:
                    p = _rates(dropout if kind == "input" else recurrent_dropout)[li]
                    c = (2 if li == 0 else dirs * HIDDEN[0]) if kind == "input" else HIDDEN[li]
                    want.append((p, c))
    assert [(p, c) for p, c, _ in drawn] == want
    for (_, c, mask) in drawn:
        assert mask.shape == (2, c, *SIZES[1])
    if bidirectional:  # the reverse direction draws its own masks, after the forward's
        first = min(li for li, _ in expected)
        per_direction = sum(li == first for li, _ in expected)
        assert not torch.equal(drawn[0][2], drawn[per_direction][2])


def test_bidirectional_draws_per_direction(drawn):
    m = _model(1, True, dropout=0.5, recurrent_dropout=0.5).train()
    x, _ = _inputs(m, 1, 2, 3, with_state=False)
    m(x)
    assert len(drawn) == 8  # 2 layers x 2 directions x (input, recurrent)
    fwd_in, rev_in = drawn[0][2], drawn[2][2]
    assert fwd_in.shape == rev_in.shape and not torch.equal(fwd_in, rev_in)
    m(x)
    assert len(drawn) == 16  # again at the next call


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_the_masks_keep_the_expectation(p, drawn):
    """Each mask is Bernoulli(1 - p) / (1 - p): values 0 and 1/(1-p), mean about 1."""
    m = _model(2, dropout=p, recurrent_dropout=p, dtype=torch.float32).train()
    with torch.no_grad():
        m(torch.randn(64, 1, 2, *SIZES[2]))
    assert len(drawn) == 4
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    for _, channels, mask in drawn:
        assert mask.shape == (64, channels, *SIZES[2]) and mask.dtype == torch.float32
        assert ((mask == 0) | (mask == scale)).all()
        # >= 64 * 2 * 20 elements: the mean's standard deviation is <= 0.025 (at p = 0.6),
        # the kept fraction's <= 0.01
        assert abs(mask.double().mean().item() - 1.0) < 0.12
        kept = (mask != 0).double().mean().item()
        assert abs(kept - (1 - p)) < 0.05


def test_rate_one_drops_everything(drawn):
    m = _model(2, dropout=1.0, recurrent_dropout=1.0).train()
    x, state = _inputs(m, 2, 2, 3)
    outs, states = m(x, state)
    assert len(drawn) == 4 and all((mask == 0).all() for _, _, mask in drawn)
    assert all(torch.isfinite(o).all() for o in outs)
    # No input and no recurrent input: the gates see the bias only, at every step.
    masks = _oracle_masks(drawn, 1.0, 1.0, False)
    _check_against_oracle(m, 2, x, state, masks, 1e-9, outs, states)
    assert (x.grad == 0).all()


# ---------------------------------------------------------------------------------------------
# Fresh masks, seeds


def test_every_call_draws_fresh_masks_and_seeds_reproduce():
    m = _model(2, True, dropout=0.3, recurrent_dropout=0.3).train()
    x, _ = _inputs(m, 2, 2, 3, with_state=False)
    with torch.no_grad():
        torch.manual_seed(11)
        first, _ = m(x)
        second, _ = m(x)
        torch.manual_seed(11)
        again, _ = m(x)
    assert not torch.equal(first[-1], second[-1])
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_gradients_are_reproducible_with_the_seed():
    m = _model(1, dropout=0.5, recurrent_dropout=0.5).train()
    grads = []
    for _ in range(2):
        torch.manual_seed(12)
        m.zero_grad(set_to_none=True)
        x, state = _inputs(m, 1, 2, 3)
        _loss(*m(x, state)).backward()
        grads.append([x.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_captured_graphs_replay_with_fresh_masks(bidirectional, graph_device, drawn):
    """With captured (emulated on CPU) time loops: the second call captures, the later ones
    replay; each call must use its own masks (match the oracle with them) and differ from the
    others; an eval call in between and after draws nothing and uses none."""
    dev = graph_device
    torch.manual_seed(3)
    m = LAYERS[2](2, 3, 3, 2, True, bidirectional=bidirectional, return_all_layers=True,
                  peephole=True, dropout=0.3, recurrent_dropout=0.3).to(dev)
    assert m.cuda_graphs
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 2, *SIZES[2], generator=g)
    state = [[torch.randn(2, (2 if bidirectional else 1) * 3, *SIZES[2], generator=g)
              for _ in range(2)] for _ in range(2)]
    fwd, rev = _oracle_params(m, 2, dilation=1)
    plain, plain_states = convlstm(x.double(), fwd, [[t.double() for t in p] for p in state],
                                   reverse=rev)
    seen, captures = [], graphs.FORWARD.captures
    for call in range(4):
        for train in (True, False):
            m.train(train)
            drawn.clear()
            xi = x.to(dev, copy=True).requires_grad_(train)
            si = [[t.to(dev, copy=True).requires_grad_(train) for t in p] for p in state]
            with torch.set_grad_enabled(train):
                outs, states = m(xi, si)
            msg = f"call {call} train={train}"
            if not train:
                assert not drawn, msg
                for a, b in zip(outs, plain):
                    assert rel_err(a.cpu(), b) <= 1e-5, msg
                continue
            masks = _oracle_masks(drawn, 0.3, 0.3, bidirectional)
            _check_against_oracle(m, 2, xi, si, masks, 1e-5, outs, states, dilation=1)
            m.zero_grad(set_to_none=True)
            for earlier in seen:
                assert rel_err(outs[-1].detach(), earlier) > 1e-3, msg
            seen.append(outs[-1].detach())
    assert graphs.FORWARD.captures > captures  # the later calls did replay captured loops


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("name", ["dropout", "recurrent_dropout"])
@pytest.mark.parametrize(("value", "error"), [
    (-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("a", TypeError),
    ([0.1, 0.2, 0.3], ValueError), ([0.1], ValueError), ([0.1, 1.5], ValueError),
], ids=["negative", "above-1", "nan", "str", "list-too-long", "list-too-short",
        "list-with-one-out"])
def test_invalid_rates_name_the_argument(name, value, error):
    pattern = r"recurrent_dropout" if name == "recurrent_dropout" else r"(?<!recurrent_)dropout"
    with pytest.raises(error, match=pattern):
        LAYERS[2](2, 3, 3, 2, True, **{name: value})


def test_valid_rates_are_accepted():
    for kw in ({"dropout": 0}, {"dropout": 1}, {"recurrent_dropout": [0.0, 1.0]},
               {"dropout": [0.5, 0.25], "recurrent_dropout": 0.1}):
        LAYERS[1](2, 3, 3, 2, True, **kw)(torch.randn(1, 2, 2, 5))
