"""Exporting a model that uses the layer: torch.export, ONNX (both exporters, run in ONNX
Runtime) and torch.jit.trace capture standard ops only, and compute what the module does.

The popular ConvLSTM exports this way (its loop is plain ops); a drop-in must not break a
user's export pipeline. Each layer is unrolled over T while exporting (export.py)."""

import pytest
import torch

from triton_convlstm import ConvLSTM, ConvLSTMCell
from triton_convlstm.backend import exporting


class _Flat(torch.nn.Module):
    """Tensors out, not nested lists (what jit.trace and the ONNX exporters accept)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x, h0, c0, h1, c1):
        outs, last = self.m(x, [(h0, c0), (h1, c1)])
        return (*outs, *(t for pair in last for t in pair))


DEVICES = [pytest.param("cuda", marks=pytest.mark.gpu), "cpu"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _model(device="cpu", padding_mode="zeros"):
    torch.manual_seed(0)
    m = ConvLSTM(3, [5, 4], [3, (2, 3)], 2, batch_first=True, peephole=True,
                 return_all_layers=True, dilation=[1, 2], padding_mode=padding_mode)
    with torch.no_grad():
        for cell in m.cell_list:
            cell.peephole.normal_(0, 0.5)
    return _Flat(m).to(device).eval()


def _inputs(batch=2, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, 3, 6, 7, generator=g)
    h0, c0 = torch.randn(2, batch, 5, 6, 7, generator=g)
    h1, c1 = torch.randn(2, batch, 4, 6, 7, generator=g)
    return tuple(t.to(device) for t in (x, h0, c0, h1, c1))


def _assert_close(got, want):
    assert len(got) == len(want) == 6
    for a, b in zip(got, want):
        a = torch.as_tensor(a, device=b.device)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _call_targets(graph) -> list[str]:
    return [str(n.target) for n in graph.nodes if n.op == "call_function"]


def test_not_exporting_while_running():
    assert not exporting()


def test_the_export_flag_decides_not_the_function(monkeypatch):
    """Dynamo before torch 2.13 answers ``torch.compiler.is_exporting()`` with a constant True
    while it traces, torch.compile included: a GPU box's torch 2.11 sent every compiled model
    down the unrolled export path (test_sequence's graph-size test caught it there). The flag
    both exporters set is what counts; a function that says True alone changes nothing.
    (Dynamo 2.13 reads the flag itself, so the old answer cannot be replayed under it.)"""
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert not exporting()
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)
    assert exporting()


def test_a_torch_without_the_export_flag_asks_the_function(monkeypatch):
    monkeypatch.delattr(torch.compiler, "_is_exporting_flag")
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert exporting()
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: False)
    assert not exporting()


# Padding modes other than zeros: reflect and circular in the two layers (wrap-around and
# mirrored borders must survive export too).
PADDINGS = ["zeros", ["circular", "reflect"]]


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("padding", PADDINGS, ids=["zeros", "circular-reflect"])
def test_torch_export_captures_standard_ops_unrolled(device, padding, strict):
    """Both export modes: non-strict runs the module in Python, strict traces it with dynamo
    (where the export flag, not torch.compiler.is_exporting(), tells export from compile)."""
    m, args = _model(device, padding), _inputs(device=device)
    with torch.no_grad():
        want = m(*args)
        exported = torch.export.export(m, args, strict=strict)
        got = exported.module()(*args)
    targets = _call_targets(exported.graph)
    assert not [t for t in targets if "triton_convlstm" in t]
    # One convolution per step and layer (T = 4, two layers).
    assert sum("convolution" in t or "conv2d" in t for t in targets) == 4 + 4
    _assert_close(got, want)


def test_torch_export_with_a_dynamic_batch(device):
    m, args = _model(device), _inputs(device=device)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        exported = torch.export.export(m, args, dynamic_shapes=({0: batch},) * 5)
        other = _inputs(batch=3, device=device)
        _assert_close(exported.module()(*other), m(*other))


def test_torch_export_of_a_training_model_keeps_gradients(device):
    m, args = _model(device), _inputs(device=device)
    m.train()
    exported = torch.export.export(m, args)
    grads = []
    for run in (exported.module(), m):  # the exported program's gradients are the module's
        x = args[0].clone().requires_grad_()
        out = run(x, *args[1:])
        grads.append(torch.autograd.grad(sum(o.sum() for o in out), [x, *m.parameters()]))
    for got, want in zip(*grads):  # relative to the largest entry: sums run in other orders
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert not [t for t in _call_targets(exported.graph) if "triton_convlstm" in t]


@pytest.mark.parametrize("padding", PADDINGS, ids=["zeros", "circular-reflect"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo-exporter", "torchscript-exporter"])
def test_onnx_export_with_a_dynamic_batch_runs_in_onnxruntime(tmp_path, dynamo, padding):
    pytest.importorskip("onnxscript")  # the test extra installs it, with onnx and onnxruntime
    ort = pytest.importorskip("onnxruntime")
    m, args = _model(padding_mode=padding), _inputs()
    path = tmp_path / "convlstm.onnx"
    names = ["x", "h0", "c0", "h1", "c1"]
    if dynamo:
        dynamic = dict(dynamic_shapes=({0: torch.export.Dim("batch")},) * len(names))
    else:
        dynamic = dict(dynamic_axes={n: {0: "batch"} for n in names})
    torch.onnx.export(m, args, str(path), dynamo=dynamo, input_names=names, **dynamic)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = _inputs(batch=3)  # not the batch it was exported with
    got = session.run(None, {n: a.numpy() for n, a in zip(names, other)})
    with torch.no_grad():
        _assert_close(got, m(*other))


def test_jit_trace_has_no_python_ops():
    m, args = _model(), _inputs()
    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):  # the shape checks' warnings
        traced = torch.jit.trace(m, args)
        got = traced(*args)
        want = m(*args)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "prim::PythonOp" not in kinds
    _assert_close(got, want)


def test_cell_with_the_triton_backend_exports_the_torch_math(device):
    torch.manual_seed(0)
    cell = ConvLSTMCell(3, 4, 3, backend="triton").to(device).eval()
    x = torch.randn(2, 3, 5, 5, device=device)
    with torch.no_grad():
        exported = torch.export.export(cell, (x,))
        targets = _call_targets(exported.graph)
        assert not [t for t in targets if "triton_convlstm" in t]
        for a, b in zip(exported.module()(x), cell(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
