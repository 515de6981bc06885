"""Variable lengths and dropout on the paths around the op: a PackedSequence in and out (as
nn.LSTM), the step-by-step module path (hooks), recompute_gates, bf16 autocast, exporters; and
the model's repr."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from triton_convlstm import ConvLSTM

LENGTHS = [3, 5, 1, 4]


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("batch_first", True)
    return ConvLSTM(2, [3, 4], 3, 2, return_all_layers=True, peephole=True, **kw).double()


def _x(b=4, t=5, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, 2, 4, 5, generator=g, dtype=dtype)


def _close(a, b, tol=1e-12):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("enforce_sorted", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_a_packed_sequence_runs_as_its_padding_with_lengths(bidirectional, enforce_sorted,
                                                            batch_first):
    """Packed in, packed out, as nn.LSTM: the outputs are packed as the input was (same batch
    sizes, same sorted and unsorted indices), the states in the original batch order, and all
    of it equal to the padded batch run with its lengths; the gradients too."""
    m = _model(bidirectional=bidirectional, batch_first=batch_first)
    lengths = sorted(LENGTHS, reverse=True) if enforce_sorted else LENGTHS
    x = _x().requires_grad_()
    seq = x if batch_first else x.transpose(0, 1)
    packed = pack_padded_sequence(seq, torch.tensor(lengths), batch_first=batch_first,
                                  enforce_sorted=enforce_sorted)
    outs, states = m(packed)
    want_outs, want_states = m(seq, lengths=lengths)
    for got, want in zip(outs, want_outs):
        assert isinstance(got, torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(got.batch_sizes, packed.batch_sizes)
        for a, b in ((got.sorted_indices, packed.sorted_indices),
                     (got.unsorted_indices, packed.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        padded, got_lengths = pad_packed_sequence(got, batch_first=True)
        assert got_lengths.tolist() == lengths
        _close(padded, want[:, : max(lengths)])
    for (h, c), (wh, wc) in zip(states, want_states):
        _close(h, wh)
        _close(c, wc)
    # The gradients reach the packed data through the padding, as through the padded input.
    loss = sum(o.data.square().sum() for o in outs) + sum(s.sum() for pair in states
                                                          for s in pair)
    (gx,) = torch.autograd.grad(loss, x)
    loss = (sum(o.square().sum() for o in want_outs)
            + sum(s.sum() for pair in want_states for s in pair))
    (want_gx,) = torch.autograd.grad(loss, x)
    _close(gx, want_gx)


def test_a_packed_sequence_and_lengths_together_are_an_error():
    m = _model()
    packed = pack_padded_sequence(_x(), torch.tensor(LENGTHS), batch_first=True,
                                  enforce_sorted=False)
    with pytest.raises(ValueError, match="lengths"):
        m(packed, lengths=LENGTHS)


def _run(m, x, seed=5, **kw):
    """Outputs, states and every gradient (x's and the parameters'), dropout's masks drawn
    from ``seed``."""
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    outs, states = m(x, **kw)
    loss = sum(o.square().sum() for o in outs) + sum(s.sum() for p in states for s in p)
    grads = torch.autograd.grad(loss, [x, *m.parameters()])
    return [*outs, *(s for p in states for s in p), *grads]


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_the_step_by_step_path_takes_lengths_and_dropout(bidirectional):
    """A hook sends the layer through its cells step by step (step_by_step.py): with lengths
    and both dropouts, the same results as the fast path, the same masks drawn."""
    kw = dict(bidirectional=bidirectional, dropout=0.3, recurrent_dropout=[0.4, 0.2])
    fast, hooked = _model(**kw), _model(**kw)
    calls = []
    hooked.cell_list[1].register_forward_hook(lambda *a: calls.append(1))
    x = _x()
    for got, want in zip(_run(hooked, x, lengths=LENGTHS), _run(fast, x, lengths=LENGTHS)):
        _close(got, want)
    assert len(calls) == 5  # T steps through the hooked cell


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_recomputed_gates_take_lengths_and_dropout(bidirectional):
    kw = dict(bidirectional=bidirectional, dropout=0.3, recurrent_dropout=0.4)
    plain, recompute = _model(**kw), _model(**kw, recompute_gates=True)
    x = _x()
    for got, want in zip(_run(recompute, x, lengths=LENGTHS), _run(plain, x, lengths=LENGTHS)):
        _close(got, want)


def test_bf16_autocast_with_lengths_stays_close_to_float32():
    m32 = _model().float()
    x = _x(dtype=torch.float32)
    want, want_states = m32(x, lengths=LENGTHS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, states = m32(x, lengths=LENGTHS)
    assert got[-1].dtype == torch.bfloat16 and states[-1][1].dtype == torch.float32
    assert not got[-1][2, 1:].any()  # past the end: exact zeros in bf16 too
    err = (got[-1].float() - want[-1]).norm() / want[-1].norm()
    assert err < 1e-2
    torch.testing.assert_close(states[-1][1], want_states[-1][1], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_torch_export_with_lengths(bidirectional):
    """Exported (standard ops, unrolled): the lengths an input of the program, so new lengths
    give new results."""
    m = _model(bidirectional=bidirectional).float().eval()
    x = _x(dtype=torch.float32)
    lengths = torch.tensor(LENGTHS)
    with torch.no_grad():
        exported = torch.export.export(m, (x,), {"lengths": lengths})
        for other in (lengths, torch.tensor([5, 2, 2, 1])):
            got = exported.module()(x, lengths=other)
            want = m(x, lengths=other)
            for a, b in zip(torch.utils._pytree.tree_leaves(got),
                            torch.utils._pytree.tree_leaves(want)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_repr_shows_dropout():
    text = repr(_model(dropout=0.25, recurrent_dropout=[0.0, 0.5]))
    assert "dropout=[0.25, 0.25]" in text and "recurrent_dropout=[0.0, 0.5]" in text
    assert "dropout" not in repr(_model())


def test_a_subclass_may_keep_its_own_dropout_module():
    """``self.dropout = nn.Dropout(p)`` in a subclass (a common pattern) stays that module;
    the layer then applies no dropout of its own."""
    class WithOwnDropout(ConvLSTM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.dropout = torch.nn.Dropout(0.5)

        def forward(self, x, hidden_state=None):
            outs, last = super().forward(x, hidden_state)
            return [self.dropout(outs[-1])], last

    torch.manual_seed(0)
    m = WithOwnDropout(2, 3, 3, 1, True).eval()
    assert isinstance(m.dropout, torch.nn.Dropout)
    plain = ConvLSTM(2, 3, 3, 1, True).eval()
    plain.load_state_dict(m.state_dict())
    x = _x(dtype=torch.float32)
    _close(m(x)[0][0], plain(x)[0][-1], tol=0)


def test_rates_set_after_construction_are_used_and_checked():
    m, built = _model(), _model(dropout=0.5)
    m.dropout = 0.5  # one number, as nn.LSTM's attribute
    m.train(), built.train()
    x = _x()
    torch.manual_seed(1)
    a = m(x)[0][-1]
    torch.manual_seed(1)
    _close(a, built(x)[0][-1])
    m.recurrent_dropout = [0.1, 1.5]
    with pytest.raises(ValueError, match="recurrent_dropout"):
        m(_x())


def test_lengths_as_numpy_ints_and_under_a_meta_default_device():
    np = pytest.importorskip("numpy")
    m = _model()
    x = _x()
    want = m(x, lengths=LENGTHS)[0][-1]
    _close(m(x, lengths=[np.int64(v) for v in LENGTHS])[0][-1], want)
    with torch.device("meta"):
        meta = ConvLSTM(2, 3, 3, 1, True)
        out = meta(torch.empty(4, 5, 2, 4, 5), lengths=LENGTHS)[0][0]
    assert out.device.type == "meta" and out.shape == (4, 5, 3, 4, 5)
