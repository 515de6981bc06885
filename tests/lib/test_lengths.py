"""Variable lengths, ``m(x, hidden_state, lengths=...)``: sample b reads steps 0..lengths[b]-1,
its outputs after them are zeros and its final state is the one after them; a bidirectional
layer's reverse direction starts at step lengths[b]-1 (as nn.LSTM with packed sequences).

Checked against the float64 oracle (tests/reference_fp64.py, which runs each sample alone over
its own steps): outputs, final states and the gradients of x, of the given state and of every
parameter, in 1, 2 and 3 spatial dims, one- and bidirectional, on the torch path and the Triton
kernels (interpreter on CPU); and against the model itself run on each sample alone; padded
steps (zero outputs, zero gradients, never read); captured graphs (emulated on CPU) with other
lengths at every call; torch.compile; the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from family_oracle import HIDDEN, LAYERS, SIZES, check_against_oracle
from family_oracle import family_model as _model
from family_oracle import loss as _loss
from family_oracle import oracle_params as _oracle_params
from family_oracle import sequence_inputs as _inputs
from reference_fp64 import convlstm, rel_err

from triton_convlstm import graphs


def _check_against_oracle(m, n, x, state, lengths, tol, batch_first=True):
    """The model's outputs, states and every gradient vs the oracle's on float64 copies."""
    return check_against_oracle(m, n, x, state, tol, lengths=lengths, batch_first=batch_first)


# ---------------------------------------------------------------------------------------------
# Against the oracle


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_mixed_lengths_match_the_oracle(n, bidirectional):
    """Lengths T, 1 and one between, from a given state."""
    m = _model(n, bidirectional)
    x, state = _inputs(m, n, 3, 4)
    _check_against_oracle(m, n, x, state, [4, 1, 2], 1e-9)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_mixed_lengths_from_zero_states_match_the_oracle(bidirectional):
    m = _model(2, bidirectional)
    x, _ = _inputs(m, 2, 3, 5, with_state=False)
    _check_against_oracle(m, 2, x, None, torch.tensor([2, 5, 3]), 1e-9)


def test_time_major_input_matches_the_oracle():
    """batch_first=False: x is (T, B, ...), lengths are still one per sample."""
    m = _model(1, True, batch_first=False)
    x, state = _inputs(m, 1, 3, 4)
    xt = x.detach().transpose(0, 1).contiguous().requires_grad_()
    outs, _ = _check_against_oracle(m, 1, xt, state, [3, 4, 1], 1e-9, batch_first=False)
    assert outs[0].shape == (3, 4, 6, *SIZES[1])  # outputs are (B, T, ...) in any case


def test_a_batch_of_one_with_length_one():
    m = _model(2, True)
    x, state = _inputs(m, 2, 1, 3)
    _check_against_oracle(m, 2, x, state, [1], 1e-9)


@pytest.mark.parametrize(("n", "bidirectional"), [(2, False), (1, True)], ids=["2d", "1d-bi"])
def test_triton_backend_matches_the_oracle(n, bidirectional):
    m = _model(n, bidirectional, backend="triton", dtype=torch.float32)
    x, state = _inputs(m, n, 2, 3, dtype=torch.float32)
    _check_against_oracle(m, n, x, state, torch.tensor([1, 3]), 1e-5)


# ---------------------------------------------------------------------------------------------
# Against the model itself


def _run(m, x, state, **kw):
    """(outputs, states, grads of x, of the state and of the parameters) of one call."""
    outs, states = m(x, state, **kw)
    _loss(outs, states).backward()
    grads = [x.grad, *(t.grad for pair in (state or []) for t in pair),
             *(p.grad for p in m.parameters())]
    return outs, states, grads


def _assert_same_run(got, want, grad_tol=None):
    """Two _run results: outputs and states equal bit for bit, the gradients too (grad_tol
    None) or within grad_tol (rel_err)."""
    for a, b in zip(got[0], want[0]):
        assert torch.equal(a, b)
    for (h1, c1), (h2, c2) in zip(got[1], want[1]):
        assert torch.equal(h1, h2) and torch.equal(c1, c2)
    for a, b in zip(got[2], want[2]):
        assert torch.equal(a, b) if grad_tol is None else rel_err(a, b) <= grad_tol


def _fresh(m, x, state):
    m = copy.deepcopy(m)
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    state = None if state is None else [[t.detach().clone().requires_grad_() for t in pair]
                                        for pair in state]
    return m, x, state


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_lengths_all_T_equal_no_lengths(bidirectional):
    base = _model(2, bidirectional)
    x, state = _inputs(base, 2, 2, 3)
    want = _run(*_fresh(base, x, state))
    for lengths in ([3, 3], torch.tensor([3, 3])):
        _assert_same_run(_run(*_fresh(base, x, state), lengths=lengths), want, 1e-13)


def test_lengths_as_a_list_or_any_integer_tensor_agree():
    base = _model(1, True)
    x, state = _inputs(base, 1, 3, 4)
    runs = [_run(*_fresh(base, x, state), lengths=v)
            for v in ([2, 4, 1], torch.tensor([2, 4, 1]), torch.tensor([2, 4, 1],
                                                                      dtype=torch.int32))]
    for got in runs[1:]:
        _assert_same_run(got, runs[0])


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("n", [1, 3])
def test_each_sample_as_if_run_alone_on_its_own_length(n, bidirectional):
    """The strongest check: the batched call equals, sample by sample, the model run on that
    sample alone cut to its length (outputs, states, the gradient of x and of the state), and
    the parameters' gradients are the sum of the samples' (the loss is a sum over samples)."""
    base = _model(n, bidirectional)
    x, state = _inputs(base, n, 3, 4)
    lengths = [3, 1, 4]
    outs, states, grads = _run(*_fresh(base, x, state), lengths=lengths)
    param_grads = [torch.zeros_like(p) for p in base.parameters()]
    for b, length in enumerate(lengths):
        xb = x.detach()[b : b + 1, :length]
        sb = [[t.detach()[b : b + 1] for t in pair] for pair in state]
        m, xb, sb = _fresh(base, xb, sb)
        o1, s1, g1 = _run(m, xb, sb)
        for a, want in zip(outs, o1):
            assert rel_err(a[b : b + 1, :length], want) <= 1e-12
        for (h, c), (h1, c1) in zip(states, s1):
            assert rel_err(h[b : b + 1], h1) <= 1e-12 and rel_err(c[b : b + 1], c1) <= 1e-12
        assert rel_err(grads[0][b : b + 1, :length], g1[0]) <= 1e-12
        n_state = 2 * len(HIDDEN)
        for got, want in zip(grads[1 : 1 + n_state], g1[1 : 1 + n_state]):
            assert rel_err(got[b : b + 1], want) <= 1e-12
        for acc, g in zip(param_grads, g1[1 + n_state :]):
            acc += g
    for got, want in zip(grads[1 + 2 * len(HIDDEN) :], param_grads):
        assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_padded_steps_are_zero_and_never_read(bidirectional, backend):
    """Outputs at t >= lengths[b] are exactly zero, padded inputs get exactly zero gradient,
    and other (finite) values there change nothing: not the outputs, states or gradients."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    base = _model(1, bidirectional, backend=backend, dtype=dtype)
    x, state = _inputs(base, 1, 2, 4, dtype=dtype)
    lengths = [2, 4] if backend == "torch" else [1, 3]
    outs, states, grads = _run(*_fresh(base, x, state), lengths=lengths)
    for b, length in enumerate(lengths):
        for o in outs:
            assert (o[b, length:] == 0).all()
            assert (o[b, :length].abs().amax(dim=tuple(range(1, o.dim() - 1))) > 0).all()
        assert (grads[0][b, length:] == 0).all()
        assert (grads[0][b, :length] != 0).any()
    garbage = x.detach().clone()
    for b, length in enumerate(lengths):
        garbage[b, length:] = 100.0 * torch.randn_like(garbage[b, length:])
    _assert_same_run(_run(*_fresh(base, garbage, state), lengths=lengths),
                     (outs, states, grads), 1e-13 if backend == "torch" else 1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_finite_padding_is_never_read(backend):
    """"Sample b reads steps 0..lengths[b]-1": NaN and inf in the padding (as some pipelines
    pad) leave outputs, states and every gradient as zero padding gives them, all finite
    (nn.LSTM with packed sequences never sees the padding either)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    base = _model(1, True, backend=backend, dtype=dtype)
    x, state = _inputs(base, 1, 2, 3, dtype=dtype)
    lengths = [1, 3]
    zero = x.detach().clone()
    zero[0, 1:] = 0
    poisoned = zero.clone()
    poisoned[0, 1] = float("nan")
    poisoned[0, 2] = float("inf")
    want = _run(*_fresh(base, zero, state), lengths=lengths)
    got = _run(*_fresh(base, poisoned, state), lengths=lengths)
    _assert_same_run(got, want, 1e-13 if backend == "torch" else 1e-6)


# ---------------------------------------------------------------------------------------------
# Captured graphs, compile


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_captured_graphs_take_each_calls_lengths(bidirectional, graph_device):
    """With captured (emulated on CPU) time loops, every call gets its own lengths: the second
    call of a signature captures, the later ones replay, and none may reuse an earlier call's
    lengths (nor a call without lengths one with, or the other way round). Training calls and
    inference calls, lengths as a list, as a tensor on the device and on the CPU."""
    dev = graph_device
    torch.manual_seed(3)
    m = LAYERS[2](2, 3, 3, 2, True, bidirectional=bidirectional, return_all_layers=True,
                  peephole=True).to(dev)
    assert m.cuda_graphs
    fwd, rev = _oracle_params(m, 2, dilation=1)
    calls = [None, [3, 1], [1, 3], torch.tensor([2, 2], device=dev), None, torch.tensor([3, 2])]
    g = torch.Generator().manual_seed(4)
    captures = graphs.FORWARD.captures
    for i, lengths in enumerate(calls):
        for train in (True, False):
            x = torch.randn(2, 3, 2, *SIZES[2], generator=g)
            x64 = x.double().requires_grad_()
            want, want_states = convlstm(x64, fwd, reverse=rev, lengths=lengths)
            xi = x.to(dev).requires_grad_(train)
            with torch.set_grad_enabled(train):
                outs, states = m(xi, lengths=lengths)
            msg = f"call {i} lengths={lengths} train={train}"
            for a, b in zip(outs, want):
                assert rel_err(a.cpu(), b) <= 1e-5, msg
            for (h, c), (h64, c64) in zip(states, want_states):
                assert rel_err(h.cpu(), h64) <= 1e-5 and rel_err(c.cpu(), c64) <= 1e-5, msg
            if train:
                _loss(outs, states).backward()
                _loss(want, want_states).backward()
                assert rel_err(xi.grad.cpu(), x64.grad) <= 1e-5, msg
    assert graphs.FORWARD.captures > captures  # the later calls did replay captured loops


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_compile_fullgraph_with_a_lengths_tensor_matches_eager(bidirectional):
    """Two calls of the compiled model with other lengths (same shapes): each its own."""
    eager = _model(1, bidirectional, dtype=torch.float32)
    x, state = _inputs(eager, 1, 2, 3, dtype=torch.float32)
    torch._dynamo.reset()
    m, _, _ = _fresh(eager, x, state)
    compiled = torch.compile(m, fullgraph=True)
    for lengths in (torch.tensor([3, 1]), torch.tensor([2, 3])):
        want = _run(*_fresh(eager, x, state), lengths=lengths)
        m.zero_grad(set_to_none=True)
        _, xc, sc = _fresh(eager, x, state)
        got = _run(compiled, xc, sc, lengths=lengths)
        for a, b in zip(got[0], want[0]):
            assert rel_err(a, b) <= 1e-5
        for (h1, c1), (h2, c2) in zip(got[1], want[1]):
            assert rel_err(h1, h2) <= 1e-5 and rel_err(c1, c2) <= 1e-5
        for a, b in zip(got[2], want[2]):
            assert rel_err(a, b) <= 1e-5


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("lengths", [
    torch.tensor([2.0, 3.0]),
    torch.tensor([True, True]),
    [2.0, 3],
    [2, "3"],
    [2, None],
], ids=["float-tensor", "bool-tensor", "float-in-list", "str-in-list", "none-in-list"])
def test_lengths_that_are_not_integers_are_a_type_error(lengths):
    m = _model(1)
    with pytest.raises(TypeError, match="lengths"):
        m(torch.randn(2, 3, 2, *SIZES[1], dtype=torch.float64), lengths=lengths)


@pytest.mark.parametrize("lengths", [
    torch.tensor([[2], [3]]),
    torch.tensor([2, 3, 1]),
    torch.tensor(2),
    [2],
    [2, 3, 3],
], ids=["2-d", "B+1", "0-d", "short-list", "long-list"])
def test_lengths_of_the_wrong_shape_are_a_value_error(lengths):
    m = _model(1)
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 3, 2, *SIZES[1], dtype=torch.float64), lengths=lengths)


@pytest.mark.parametrize("lengths", [[0, 3], [2, 4], [-1, 2], torch.tensor([3, 0])],
                         ids=["zero", "above-T", "negative", "tensor-zero"])
def test_lengths_outside_1_to_T_are_a_value_error(lengths):
    m = _model(1, True)
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 3, 2, *SIZES[1], dtype=torch.float64), lengths=lengths)

