"""The family: ConvLSTM1d/2d/3d and their cells, one- and bidirectional, against the float64
oracle (tests/reference_fp64.py, written from the equations for any number of spatial dims):
outputs, final states and the gradients of x, of the given state and of every parameter; on
the torch path and the Triton kernels (interpreter on CPU); and the paths around the op:
captured graphs (emulated on CPU), recompute_gates, autocast, compile, export."""

from __future__ import annotations

import copy

import pytest
import torch
from family_oracle import CELLS, LAYERS
from reference_fp64 import LayerParams, cell_step, convlstm, params_from_module, rel_err
from torch import nn

import triton_convlstm
from triton_convlstm import ConvLSTM, ConvLSTMCell
from triton_convlstm.modules import (
    ConvLSTM1d,
    ConvLSTM2d,
    ConvLSTM3d,
    ConvLSTMCell2d,
)

SIZES = {1: (9,), 2: (5, 6), 3: (3, 4, 5)}
# An even kernel and a dilation in each: (kernel per layer, dilation per layer).
KERNELS = {1: ([3, 2], [1, 2]), 2: ([3, (2, 3)], [1, (1, 2)]), 3: ([3, (2, 3, 1)], [1, (1, 1, 2)])}


def _model(n, bidirectional, backend="torch", seed=0, **kw):
    torch.manual_seed(seed)
    kernels, dilations = KERNELS[n]
    m = LAYERS[n](2, [3, 4], kernels, 2, True, return_all_layers=True, peephole=True,
                  dilation=dilations, bidirectional=bidirectional, backend=backend, **kw)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("peephole"):
                p.normal_(0, 0.5)
    return m


def _oracle_params(m, n):
    dil = KERNELS[n][1]
    fwd = params_from_module(m, 2, dil, spatial_dims=n)
    rev = (params_from_module(m, 2, dil, prefix="cell_list_reverse", spatial_dims=n)
           if m.bidirectional else None)
    return fwd, rev


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_family_matches_the_oracle(n, bidirectional, backend):
    m = _model(n, bidirectional, backend)
    dirs = 2 if bidirectional else 1
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 2, *SIZES[n], generator=g, requires_grad=True)
    state = [[(0.5 * torch.randn(2, dirs * hid, *SIZES[n], generator=g)).requires_grad_()
              for _ in range(2)] for hid in (3, 4)]
    outs, states = m(x, state)
    fwd, rev = _oracle_params(m, n)
    x64 = x.detach().double().requires_grad_()
    s64 = [[t.detach().double().requires_grad_() for t in pair] for pair in state]
    want, want_states = convlstm(x64, fwd, s64, reverse=rev)
    for a, b in zip(outs, want):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-5
    for (h, c), (h64, c64) in zip(states, want_states):
        assert rel_err(h, h64) <= 1e-5 and rel_err(c, c64) <= 1e-5
    loss = sum((o * o).sum() for o in outs) + sum(c.sum() for _, c in states)
    loss64 = sum((o * o).sum() for o in want) + sum(c.sum() for _, c in want_states)
    loss.backward()
    loss64.backward()
    assert rel_err(x.grad, x64.grad) <= 1e-5
    for pair, pair64 in zip(state, s64):
        for t, t64 in zip(pair, pair64):
            assert rel_err(t.grad, t64.grad) <= 1e-5
    cells = [*m.cell_list, *(m.cell_list_reverse if bidirectional else [])]
    params = [*fwd, *(rev or [])]
    for cell, p in zip(cells, params):
        assert rel_err(cell.conv.weight.grad, p.weight.grad) <= 1e-5
        assert rel_err(cell.conv.bias.grad, p.bias.grad) <= 1e-5
        assert rel_err(cell.peephole.grad, p.peephole.grad) <= 1e-5


@pytest.mark.parametrize("n", [1, 2, 3])
def test_parameters_and_names(n):
    m = LAYERS[n](2, [3, 4], 3, 2, bidirectional=True)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    sd = m.state_dict()
    for prefix in ("cell_list", "cell_list_reverse"):
        assert type(getattr(m, prefix)[0].conv) is conv
        assert sd[f"{prefix}.0.conv.weight"].shape == (12, 2 + 3, *([3] * n))
        assert sd[f"{prefix}.1.conv.weight"].shape == (16, 2 * 3 + 4, *([3] * n))
        assert sd[f"{prefix}.1.conv.bias"].shape == (16,)
    assert not any(k.startswith("cell_list_reverse") for k in LAYERS[n](2, 3, 3, 1).state_dict())
    assert ConvLSTM2d is ConvLSTM and ConvLSTMCell2d is ConvLSTMCell
    assert {"ConvLSTM1d", "ConvLSTM3d", "ConvLSTMCell1d", "ConvLSTMCell3d"} <= set(
        triton_convlstm.__all__)


@pytest.mark.parametrize("n", [1, 3])
def test_cells_match_the_oracle_step(n):
    torch.manual_seed(2)
    cell = CELLS[n](2, 3, 2, peephole=True, dilation=2).double()
    with torch.no_grad():
        cell.peephole.normal_(0, 0.5)
    x = torch.randn(2, 2, *SIZES[n], dtype=torch.float64)
    h, c = (torch.randn(2, 3, *SIZES[n], dtype=torch.float64) for _ in range(2))
    p = LayerParams(cell.conv.weight.detach(), cell.conv.bias.detach(),
                    cell.peephole.detach(), (2,) * n)
    for got, want in zip(cell(x, (h, c)), cell_step(x, h, c, p)):
        assert rel_err(got, want) <= 1e-12
    assert cell.init_hidden(2, SIZES[n])[0].shape == (2, 3, *SIZES[n])


def test_the_reverse_direction_reads_the_sequence_backwards():
    """A change of x at t = 3 reaches the outputs' reverse half at t <= 3 only and the forward
    half at t >= 3 only."""
    m = ConvLSTM1d(1, 2, 3, 1, True, bidirectional=True, backend="torch").double()
    x = torch.randn(1, 5, 1, 6, dtype=torch.float64)
    base, _ = m(x)
    later = x.clone()
    later[:, 3] += 1.0  # a change at t = 3 reaches the reverse half at t <= 3 only
    changed, _ = m(later)
    diff = (changed[0] - base[0]).abs().amax(dim=(0, 3))  # (T, 2*hidden)
    assert (diff[:4, 2:] > 0).all() and (diff[4:, 2:] == 0).all()
    assert (diff[:3, :2] == 0).all() and (diff[3:, :2] > 0).all()  # forward: t >= 3


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_captured_graphs_and_recompute(n, bidirectional, graph_device):
    dev = graph_device
    torch.manual_seed(3)
    base = LAYERS[n](2, 3, 3, 2, True, bidirectional=bidirectional, return_all_layers=True)
    graphed = copy.deepcopy(base).to(dev)
    graphed.recompute_gates = True
    ref = copy.deepcopy(base).to(dev)
    ref.cuda_graphs = False
    for _ in range(3):  # the second call captures, the third replays
        x = torch.randn(2, 3, 2, *SIZES[n], device=dev)
        outs = []
        for m in (graphed, ref):
            xi = x.clone().requires_grad_()
            o, s = m(xi)
            (o[-1].square().sum() + s[-1][1].sum()).backward()
            outs.append((o[-1].detach(), xi.grad))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_autocast_bf16_in_1d_and_3d():
    for n in (1, 3):
        torch.manual_seed(4)
        m = LAYERS[n](2, 3, 3, 1, True, bidirectional=True, backend="torch")
        x = torch.randn(2, 3, 2, *SIZES[n])
        want, _ = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, states = m(x)
        assert got[0].dtype == torch.bfloat16 and states[0][1].dtype == torch.float32
        assert rel_err(got[0], want[0]) <= 3e-2


@pytest.mark.parametrize("n", [1, 3])
def test_compile_fullgraph_bidirectional(n):
    m = _model(n, True)
    x = torch.randn(1, 2, 2, *SIZES[n], requires_grad=True)
    want, _ = m(x)
    torch._dynamo.reset()
    got, _ = torch.compile(m, fullgraph=True)(x)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


def test_export_of_3d_and_bidirectional_models():
    for n, bi in ((3, False), (1, True)):
        m = _model(n, bi).eval()
        x = torch.randn(1, 3, 2, *SIZES[n])
        with torch.no_grad():
            want = m(x)[0][-1]
            program = torch.export.export(m, (x,))
            got = program.module()(x)[0][-1]
        assert rel_err(got, want) <= 1e-6
        assert not [n for n in program.graph.nodes if "triton_convlstm" in str(n.target)]


@pytest.mark.parametrize(("n", "bi"), [(3, False), (2, True)], ids=["3d", "bidirectional"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, n, bi):
    pytest.importorskip("onnxscript")  # the test extra installs it, with onnx and onnxruntime
    ort = pytest.importorskip("onnxruntime")

    class Flat(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            outs, states = self.m(x)
            return outs[-1], states[-1][0], states[-1][1]

    m = Flat(_model(n, bi)).eval()
    x = torch.randn(1, 3, 2, *SIZES[n])
    path = tmp_path / "model.onnx"
    torch.onnx.export(m, (x,), str(path), dynamo=True, input_names=["x"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})
    with torch.no_grad():
        for a, b in zip(got, m(x)):
            torch.testing.assert_close(torch.as_tensor(a), b, rtol=1e-5, atol=1e-5)


def test_the_ops_pass_opcheck_in_1d_and_3d():
    from triton_convlstm.layer_op import layer_backward_op, layer_forward_op

    for n in (1, 3):
        torch.manual_seed(5)
        x = torch.randn(2, 1, 2, *SIZES[n], dtype=torch.float64, requires_grad=True)
        w = torch.randn(12, 5, *([3] * n), dtype=torch.float64, requires_grad=True)
        b = torch.randn(12, dtype=torch.float64, requires_grad=True)
        args = (x, w, b, None, None, None, [1] * n, "torch", True, False)
        torch.library.opcheck(layer_forward_op, args)
        h_seq, c_last, c_seq, z_seq = layer_forward_op(*args)
        bargs = (torch.randn_like(h_seq), None, x.detach(), w.detach(), None, None, None,
                 h_seq.detach(), c_last.detach(), c_seq, z_seq, [1] * n, "torch",
                 [True, True, False, False, False, False], False)
        torch.library.opcheck(layer_backward_op, bargs)


@pytest.mark.parametrize(("n", "shape", "match"), [
    (1, (2, 3, 2, 5, 6), r"expected 4 dims \(B, T, C, L\), got 5"),
    (3, (2, 3, 2, 5, 6), r"expected 6 dims \(B, T, C, D, H, W\), got 5"),
])
def test_inputs_of_the_wrong_dims_are_named(n, shape, match):
    with pytest.raises(ValueError, match=match):
        LAYERS[n](2, 3, 3, 1, True)(torch.randn(*shape))
    with pytest.raises(ValueError, match=r"input_tensor: expected"):
        CELLS[n](2, 3, 3)(torch.randn(*shape[1:]))


def test_kernel_sizes_per_dimensionality():
    assert ConvLSTM3d(2, 3, (3, 1, 2), 1).cell_list[0].kernel_size == (3, 1, 2)
    assert ConvLSTM1d(2, 3, [3, 5], 2).kernel_size == [(3,), (5,)]
    with pytest.raises(TypeError, match=r"kernel_size: expected an int or a tuple of 3 ints"):
        ConvLSTM3d(2, 3, [(3, 3)], 1)
    with pytest.raises(ValueError, match=r"hidden_state\[0\] h: expected shape \(2, 6, 9\)"):
        ConvLSTM1d(2, 3, 3, 1, True, bidirectional=True)(
            torch.randn(2, 4, 2, 9), [(torch.zeros(2, 3, 9), torch.zeros(2, 3, 9))])


def test_a_tuple_of_the_wrong_length_is_not_one_per_layer():
    """A 2-d (kh, kw) given to a 3-d layer of two layers must not pass as two kernels."""
    with pytest.raises(TypeError, match=r"kernel_size: expected an int, a tuple of 3 ints, or "
                                        r"a list with one per layer, got tuple \(1, 3\)"):
        ConvLSTM3d(2, 3, (1, 3), 2)
    with pytest.raises(TypeError, match=r"dilation: expected an int, a tuple of 1 int, or a "
                                        r"list"):
        ConvLSTM1d(2, 3, 3, 2, dilation=(1, 2))
    assert ConvLSTM1d(2, 3, [3, 5], 2).kernel_size == [(3,), (5,)]
    assert ConvLSTM(2, 3, (3, 5), 2).kernel_size == [(3, 5), (3, 5)]  # 2-d: one pair


def test_a_bidirectional_state_of_one_direction_is_explained():
    with pytest.raises(ValueError, match=r"2\*hidden channels, the forward direction's half"):
        ConvLSTM1d(2, 3, 3, 1, True, bidirectional=True)(
            torch.randn(2, 4, 2, 9), [(torch.zeros(2, 3, 9), torch.zeros(2, 3, 9))])
