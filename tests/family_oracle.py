"""Shared by the lengths and dropout tests: a small two-layer model of each spatial rank (an
even kernel, a dilation, peepholes), its inputs, and one check of outputs, final states and
every gradient against the float64 oracle (reference_fp64.convlstm) on float64 copies. Its
tables of the family's classes serve the family and quick-step tests too."""

from __future__ import annotations

import torch
from reference_fp64 import convlstm, params_from_module, rel_err

from triton_convlstm.modules import (
    ConvLSTM1d,
    ConvLSTM2d,
    ConvLSTM3d,
    ConvLSTMCell1d,
    ConvLSTMCell2d,
    ConvLSTMCell3d,
)

# The family by spatial rank (test_family and test_quick_step read these too).
LAYERS = {1: ConvLSTM1d, 2: ConvLSTM2d, 3: ConvLSTM3d}
CELLS = {1: ConvLSTMCell1d, 2: ConvLSTMCell2d, 3: ConvLSTMCell3d}
SIZES = {1: (7,), 2: (4, 5), 3: (3, 3, 4)}
KERNELS, DILATIONS = [3, 2], [1, 2]  # an even kernel and a dilation
HIDDEN = [3, 4]


def family_model(n, bidirectional=False, backend="torch", dtype=torch.float64, seed=0,
                 dilation=None, **kw):
    """A two-layer n-d model with random peepholes (batch_first unless said)."""
    torch.manual_seed(seed)
    m = LAYERS[n](2, HIDDEN, kw.pop("kernel_size", KERNELS), 2, kw.pop("batch_first", True),
                  return_all_layers=True, peephole=True, dilation=dilation or DILATIONS,
                  bidirectional=bidirectional, backend=backend, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("peephole"):
                p.normal_(0, 0.5)
    return m.to(dtype)


def oracle_params(m, n, dilation=DILATIONS):
    """The oracle's parameters of m, on the CPU as its inputs (leaf64) whatever m's device:
    (forward layers, reverse layers or None)."""
    fwd = params_from_module(m, 2, dilation, spatial_dims=n, device="cpu")
    rev = (params_from_module(m, 2, dilation, prefix="cell_list_reverse", spatial_dims=n,
                              device="cpu") if m.bidirectional else None)
    return fwd, rev


def sequence_inputs(m, n, b, t, dtype=torch.float64, with_state=True, seed=1):
    """x (B, T, 2, *spatial) and, if with_state, one given (h, c) per layer, all leaves."""
    g = torch.Generator().manual_seed(seed)
    dirs = 2 if m.bidirectional else 1
    x = torch.randn(b, t, 2, *SIZES[n], generator=g, dtype=dtype).requires_grad_()
    state = None
    if with_state:
        state = [[(0.5 * torch.randn(b, dirs * hid, *SIZES[n], generator=g, dtype=dtype))
                  .requires_grad_() for _ in range(2)] for hid in HIDDEN]
    return x, state


def loss(outs, states):
    """Every output and every final h and c reach the loss, sample by sample separably."""
    return (sum((o * o).sum() for o in outs) + sum(c.sum() for _, c in states)
            + sum((0.5 * h).sum() for h, _ in states))


def leaf64(t):
    return None if t is None else t.detach().cpu().double().requires_grad_()


def check_against_oracle(m, n, x, state, tol, *, outs=None, states=None, lengths=None,
                         masks=None, dilation=DILATIONS, batch_first=True, grads=True):
    """The model's outputs, final states and every gradient (x's, the state's, every
    parameter's) against the oracle's. ``outs, states``: the model's already (a call whose
    masks were recorded), else it is called here with ``lengths``."""
    if outs is None:
        outs, states = m(x, state, lengths=lengths)
    fwd, rev = oracle_params(m, n, dilation)
    x64 = leaf64(x)
    s64 = None if state is None else [[leaf64(t) for t in pair] for pair in state]
    want, want_states = convlstm(x64, fwd, s64, batch_first=batch_first, reverse=rev,
                                 lengths=lengths, masks=masks)
    assert len(outs) == len(want)
    for a, b in zip(outs, want):
        assert a.shape == b.shape and rel_err(a.cpu(), b) <= tol, rel_err(a.cpu(), b)
    for (h, c), (h64, c64) in zip(states, want_states):
        assert rel_err(h.cpu(), h64) <= tol and rel_err(c.cpu(), c64) <= tol, (
            rel_err(h.cpu(), h64), rel_err(c.cpu(), c64))
    if not grads:
        return outs, states
    loss(outs, states).backward()
    loss(want, want_states).backward()
    assert rel_err(x.grad.cpu(), x64.grad) <= tol, rel_err(x.grad.cpu(), x64.grad)
    if state is not None:
        for pair, pair64 in zip(state, s64):
            for t, t64 in zip(pair, pair64):
                assert rel_err(t.grad.cpu(), t64.grad) <= tol, rel_err(t.grad.cpu(), t64.grad)
    cells = [*m.cell_list, *(m.cell_list_reverse if m.bidirectional else [])]
    for cell, p in zip(cells, [*fwd, *(rev or [])]):
        assert rel_err(cell.conv.weight.grad.cpu(), p.weight.grad) <= tol
        assert rel_err(cell.conv.bias.grad.cpu(), p.bias.grad) <= tol
        assert rel_err(cell.peephole.grad.cpu(), p.peephole.grad) <= tol
    return outs, states
