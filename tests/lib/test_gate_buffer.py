"""gate_buffer: the CPU saved gates' mark, and the custom op's backward that overwrites marked
gates once (torch.compile's path) and runs the forward again for a second backward."""

import pytest
import torch

from triton_convlstm import ConvLSTM, gate_buffer
from triton_convlstm import layer_op as layer_op_module
from triton_convlstm.layer_op import layer_forward_op
from triton_convlstm.layout import empty_seq


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spatial", [(7,), (5, 6), (3, 4, 5)])
def test_marked_buffer_has_empty_seqs_strides_and_is_claimed_once(dtype, spatial):
    z = gate_buffer.empty_gates(3, 2, 8, *spatial, dtype=dtype, device="cpu")
    want = empty_seq(3, 2, 8, *spatial, dtype=dtype, device="cpu")
    assert (z.shape, z.stride(), z.dtype, z.storage_offset()) == (
        want.shape, want.stride(), want.dtype, 0)
    z.fill_(1.5)  # every element writable without touching the mark
    assert gate_buffer.claim(z) is True
    assert gate_buffer.claim(z) is False
    assert gate_buffer.claim(z) is False
    assert (z == 1.5).all()


def test_copies_views_and_other_buffers_are_unmarked():
    z = gate_buffer.empty_gates(3, 2, 8, 5, 6, dtype=torch.float32, device="cpu")
    assert gate_buffer.claim(z.clone()) is None  # a saved-tensor hook's copy
    assert gate_buffer.claim(z[1:]) is None  # not the buffer's start
    assert gate_buffer.claim(z[:2]) is None  # the mark is not just past its end
    assert gate_buffer.claim(empty_seq(3, 2, 8, 5, 6, dtype=torch.float32, device="cpu")) is None
    assert gate_buffer.claim(torch.empty(0)) is None
    longer = torch.zeros(z.numel() + 2)  # a storage merely 8 bytes longer: no magic bytes
    assert gate_buffer.claim(longer[: z.numel()]) is None
    assert gate_buffer.claim(z) is True  # none of the above touched it


def test_meta_buffers_are_plain():
    z = gate_buffer.empty_gates(3, 2, 8, 5, 6, dtype=torch.float32, device="meta")
    want = empty_seq(3, 2, 8, 5, 6, dtype=torch.float32, device="meta")
    assert z.stride() == want.stride() and z.untyped_storage().nbytes() == want.nbytes


def _op_grads(z_of=lambda z: z):
    """The op's forward, then its backward twice over the same saved tensors (what
    retain_graph does), the gates passed through z_of (a saved-tensor hook)."""
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g) for s in ((4, 2, 3, 5, 6), (20, 8, 3, 3), (20,)))
    h_seq, c_last, c_seq, z_seq = layer_forward_op(x, w, b, None, None, None, [1, 1], "torch",
                                                   True, False)
    grad = torch.randn(h_seq.shape, generator=g)
    needs = [True, True, True, False, False, False]
    saved = z_of(z_seq)
    before = saved.clone()
    run = lambda: layer_op_module.layer_backward_op(
        grad, None, x, w, None, None, None, h_seq, c_last, c_seq, saved, [1, 1], "torch",
        needs, False, True, b)
    return run(), run(), saved, before


def test_the_ops_backward_overwrites_marked_gates_once_then_reruns_the_forward(monkeypatch):
    reruns = []
    real = layer_op_module._forward_runner
    monkeypatch.setattr(layer_op_module, "_forward_runner",
                        lambda *a: reruns.append(1) or real(*a))
    first, second, saved, before = _op_grads()
    assert not torch.equal(saved, before)  # overwritten by the first backward
    assert len(reruns) == 2  # the forward, then again in the second backward only
    for a, b in zip(first, second):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_the_ops_backward_leaves_unmarked_gates_intact():
    first, second, saved, before = _op_grads(lambda z: z.clone())
    torch.testing.assert_close(saved, before, rtol=0, atol=0)
    for a, b in zip(first, second):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["fp32", "fp64", "initial-state"])
def test_compiled_model_overwrites_the_gates_and_retain_graph_still_matches_eager(monkeypatch,
                                                                               case):
    """torch.compile's backward claims the gates (overwriting them, as eager does), and a second
    backward through the same compiled forward gets the eager gradients again. fp64 and a
    given h0 overwrite them with torch's in-place ops (the C kernels bump no version): the
    second backward must still unpack them."""
    claims = []
    real = gate_buffer.claim
    monkeypatch.setattr(gate_buffer, "claim", lambda z: claims.append(real(z)) or claims[-1])
    torch.manual_seed(0)
    dtype = torch.float64 if case == "fp64" else torch.float32
    m = ConvLSTM(3, [4, 5], (3, 3), 2, batch_first=True).to(dtype)
    x = torch.randn(2, 4, 3, 6, 5, dtype=dtype, requires_grad=True)
    state = None
    if case == "initial-state":
        state = [(torch.randn(2, hid, 6, 5), torch.randn(2, hid, 6, 5)) for hid in (4, 5)]
    leaves = [x, *m.parameters()]
    outs, _ = m(x, state)
    want = torch.autograd.grad(outs[-1].square().sum(), leaves)
    torch._dynamo.reset()
    outs, _ = torch.compile(m, backend="aot_eager", fullgraph=True)(x, state)
    loss = outs[-1].square().sum()
    claims.clear()
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    assert claims == [True, True]  # both layers' gates, each overwritten once
    second = torch.autograd.grad(loss, leaves)
    assert claims[2:] == [False, False]
    for a, b, c in zip(first, second, want):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_overwriting_marked_gates_is_a_known_schema_break():
    """The op's schema declares no input mutable; overwriting marked gates breaks it on
    purpose (declared, functionalization would copy them first). PyTorch's schema checker
    says so, naming the argument; unmarked gates pass it."""
    from torch._subclasses.schema_check_mode import SchemaCheckMode

    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 1, 2, 4, 5, generator=g), torch.randn(12, 5, 3, 3, generator=g)
    h_seq, c_last, c_seq, z_seq = layer_forward_op(x, w, None, None, None, None, [1, 1],
                                                   "torch", True, False)
    needs = [True, True, False, False, False, False]
    run = lambda z: layer_op_module.layer_backward_op(
        torch.ones_like(h_seq), None, x, w, None, None, None, h_seq, c_last, c_seq, z, [1, 1],
        "torch", needs, False)
    with SchemaCheckMode():
        run(z_seq.clone())
    with pytest.raises(RuntimeError, match="z_seq is not defined as mutable"), SchemaCheckMode():
        run(z_seq)
