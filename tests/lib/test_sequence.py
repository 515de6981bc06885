"""The whole-sequence path (layer op, time loops) on CPU: torch gate math and, under the Triton
interpreter, the real kernels; checked against a float64 run of the same module."""

import pytest
import torch
from reference_fp64 import convlstm, params_from_module, rel_err

from conftest import DEVICE, DEVICE_MARKS
from triton_convlstm import ConvLSTM, sequence
from triton_convlstm.layer_op import layer_forward_op

pytestmark = DEVICE_MARKS


def _model(backend, peephole=True, **kw):
    torch.manual_seed(1)
    m = ConvLSTM(2, [3, 5], [3, (2, 3)], 2, batch_first=True, return_all_layers=True,
                 peephole=peephole, backend=backend, **kw)
    if peephole:
        with torch.no_grad():
            for cell in m.cell_list:
                cell.peephole.normal_()
    return m.to(DEVICE)


def _inputs(dtype=torch.float32, state=True, t=4):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, t, 2, 5, 6, generator=g).to(DEVICE, dtype).requires_grad_()
    if not state:
        return x, None
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    st = [
        (torch.randn(2, hid, 5, 6, generator=g).to(DEVICE, dtype).requires_grad_(),
         torch.randn(2, hid, 5, 6, generator=g).to(DEVICE, sdt).requires_grad_())
        for hid in (3, 5)
    ]
    return x, st


def _run(m, x, st):
    outs, last = m(x, st)
    loss = sum((o.float() ** 2).sum() for o in outs) + sum(
        h.float().sum() + 0.5 * c.sum() for h, c in last
    )
    leaves = [x] + ([t for pair in st for t in pair] if st else []) + list(m.parameters())
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs] + [t.detach() for pair in last for t in pair] + list(grads)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# The torch path on CPU convolves [x_t, h] per step in its forward (sequence.cat_convs); the
# split form it uses elsewhere (and the Triton path always) is forced here too.
@pytest.mark.parametrize(("backend", "convs"), [("torch", "device-default"), ("torch", "split"),
                                                ("triton", "device-default")])
@pytest.mark.parametrize("state", [True, False], ids=["state", "zeros"])
@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recomputed"])
def test_layer_matches_float64(backend, convs, state, recompute, monkeypatch):
    if convs == "split":
        monkeypatch.setattr(sequence, "cat_convs", lambda spec, x: False)
    ref_m = _model("torch").double()
    x, st = _inputs(torch.float64, state)
    ref = _run(ref_m, x, st)
    m = _model(backend, recompute_gates=recompute)
    x32 = x.detach().float().requires_grad_()
    st32 = None if st is None else [
        (h.detach().float().requires_grad_(), c.detach().float().requires_grad_()) for h, c in st
    ]
    got = _run(m, x32, st32)
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.isfinite(a).all(), i
        assert _rel(a, b) < 2e-5, (i, _rel(a, b))


def test_inference_saves_nothing_and_matches_training_forward():
    m = _model("torch")
    x, st = _inputs()
    with torch.no_grad():
        outs_ng, last_ng = m(x, st)
    outs, last = m(x, st)
    torch.testing.assert_close(outs_ng[1], outs[1].detach(), rtol=0, atol=0)
    torch.testing.assert_close(last_ng[1][1], last[1][1].detach(), rtol=0, atol=0)
    cell = m.cell_list[0]
    seq = x.detach().transpose(0, 1)
    h_seq, c_last, c_seq, z_seq = layer_forward_op(
        seq, cell.conv.weight.detach(), cell.conv.bias.detach(), cell.peephole.detach(),
        None, None, [1, 1], "torch", False, False,
    )
    assert c_seq.numel() == 0 and z_seq.numel() == 0
    assert h_seq.shape == (4, 2, 3, 5, 6) and c_last.shape == (2, 3, 5, 6)


def test_zero_state_equals_no_state():
    m = _model("torch")
    x, _ = _inputs()
    zeros = [tuple(x.new_zeros(2, hid, 5, 6).requires_grad_() for _ in "hc") for hid in (3, 5)]
    a = _run(m, x, None)
    b = _run(m, x, zeros)
    n_params = len(list(m.parameters()))
    b = b[: len(a) - n_params] + b[-n_params:]  # drop the state gradients
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


def test_gradient_only_through_last_cell():
    """Only c_last used: the last layer's backward gets no h gradient at all, yet the recurrent
    gradient (through h_{t-1} into every earlier step) must still flow."""
    m = _model("torch")
    x, st = _inputs()
    _, last = m(x, st)
    last[-1][1].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # The float64 oracle, written from the equations (nothing shared with the package).
    params = params_from_module(m, 2)
    x64 = x.detach().double().requires_grad_()
    st64 = [tuple(t.detach().double().requires_grad_() for t in pair) for pair in st]
    _, last64 = convlstm(x64, params, st64)
    last64[-1][1].sum().backward()
    named = {f"cell_list.{i}.{k}": t for i, p in enumerate(params)
             for k, t in (("conv.weight", p.weight), ("conv.bias", p.bias),
                          ("peephole", p.peephole))}
    ours = [x, *[t for pair in st for t in pair], *dict(m.named_parameters()).values()]
    oracle = [x64, *[t for pair in st64 for t in pair],
              *[named[k] for k, _ in m.named_parameters()]]
    for i, (a, b) in enumerate(zip(ours, oracle)):
        assert a.shape == b.shape, i
        if b.grad is None:  # the last layer's h0 reaches c_last only through its gates
            assert a.grad is None or not a.grad.any(), i
            continue
        assert a.grad is not None, i
        assert rel_err(a.grad, b.grad) < 1e-5, (i, rel_err(a.grad, b.grad))


def test_backward_of_no_grad_run_is_impossible():
    m = _model("torch")
    x, _ = _inputs()
    with torch.no_grad():
        outs, _ = m(x)
    assert not outs[0].requires_grad
    # The op itself, run with save=False on inputs that require grad: nothing was saved, so its
    # backward must refuse rather than read empty buffers.
    args = _op_args()
    args[8] = False  # save
    h_seq, c_last, c_seq, z_seq = layer_forward_op(*args)
    assert c_seq.numel() == 0 and z_seq.numel() == 0 and h_seq.requires_grad
    with pytest.raises(RuntimeError, match="backward through a forward that ran without grad"):
        ((h_seq**2).sum() + c_last.sum()).backward()


def test_compile_fullgraph_matches_eager():
    m = _model("torch", peephole=False)
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(2, 3, 2, 5, 6, device=DEVICE)
    outs, last = compiled(x)
    ref_outs, ref_last = m(x)
    torch.testing.assert_close(outs[1], ref_outs[1])
    torch.testing.assert_close(last[1][1], ref_last[1][1])


def test_compiled_forward_asks_nothing_of_the_graph_cache(monkeypatch):
    """While dynamo traces, the module must not call into the graph cache: can_capture queries
    CUDA stream state (which dynamo cannot trace under fullgraph), slot_of registers finalizers;
    the op's own implementation runs them later, outside the trace."""
    from triton_convlstm import graphs

    def refuse(name):
        real = getattr(graphs, name)

        def guarded(*a, **k):
            if torch.compiler.is_compiling():
                raise AssertionError(f"graphs.{name} called while compiling")
            return real(*a, **k)
        return guarded

    for name in ("can_capture", "slot_of"):
        monkeypatch.setattr(graphs, name, refuse(name))
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)  # the eager path would capture here
    torch._dynamo.reset()
    m = _model("torch", peephole=False)
    x = torch.randn(2, 3, 2, 5, 6, device=DEVICE)
    outs, _ = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(outs[1], m(x)[0][1])
    graphs.clear()


def test_compiled_graph_does_not_grow_with_T():
    """The time loop lives inside one op per layer: dynamo's graph has the same size at any T."""
    sizes = {}

    def counting_backend(gm, example_inputs):
        sizes[current] = len(gm.graph.nodes)
        return gm.forward

    m = _model("torch", peephole=False)
    for current in (2, 16):
        torch._dynamo.reset()
        x = torch.randn(1, current, 2, 5, 6, device=DEVICE)
        torch.compile(m, backend=counting_backend, fullgraph=True)(x)
    assert sizes[2] == sizes[16]


def _op_args(requires_grad=True, peephole=True, t=3):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_(requires_grad)
    x, w, b = r(t, 2, 2, 5, 4), r(12, 5, 3, 3), r(12)
    p = r(3, 3) if peephole else None
    h0, c0 = r(2, 3, 5, 4), r(2, 3, 5, 4)
    return [x, w, b, p, h0, c0, [1, 1], "torch", requires_grad, False]


def test_compiled_training_with_recomputed_gates_matches_eager():
    """torch.compile's path (the custom ops, their fake kernels and autograd) with the gates
    recomputed in the backward (the op then needs the bias there too)."""
    m = _model("torch", recompute_gates=True)
    x, st = _inputs()
    want = _run(m, x, st)
    torch._dynamo.reset()
    got = _run(torch.compile(m, backend="aot_eager", fullgraph=True), x, st)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_layer_op_passes_opcheck():
    torch.library.opcheck(layer_forward_op, tuple(_op_args()))
    torch.library.opcheck(layer_forward_op, tuple(_op_args(requires_grad=False, peephole=False)))
    torch.library.opcheck(layer_forward_op, tuple(_op_args()) + (False,))  # gates recomputed


def test_eager_path_equals_custom_op_path():
    """run_layer's autograd.Function (eager) and the custom op (compile) are one function."""
    from triton_convlstm.layer_op import run_layer

    results = []
    for fn in (run_layer, layer_forward_op):
        args = _op_args()
        h_seq, c_last, _, _ = fn(*args)
        loss = (h_seq**2).sum() + c_last.sum()
        leaves = [a for a in args[:6] if isinstance(a, torch.Tensor)]
        results.append([h_seq.detach(), c_last.detach(), *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# T=5 steps, chunked to 3 (hidden 3) and 2 (hidden 5) steps per chunk: the last chunk is short.
_CHUNK_T = 5
_CHUNK_BYTES = 2 * (2 * 4 * 5 * 5 * 6 * 4)  # two steps of the hidden-5 layer's gates (B2 5x6 fp32)


def _chunk_spy(monkeypatch, chunk_bytes=_CHUNK_BYTES):
    """Make chunks hold fewer steps than T; record what the chunk-size helpers return."""
    seen = []

    def spy(real):
        def wrapped(t, *a):
            n = real(t, *a)
            seen.append((t, n))
            return n
        return wrapped

    for name in ("steps_per_chunk", "recompute_steps"):
        monkeypatch.setattr(sequence, name, spy(getattr(sequence, name)))
    monkeypatch.setattr(sequence, "CHUNK_BYTES", chunk_bytes)
    return seen


def _assert_chunked(seen):
    """Some loop ran in chunks of several steps, fewer than T, and T is not a multiple of them."""
    assert any(t == _CHUNK_T and 1 < n < t and t % n for t, n in seen), seen


# The torch path on CPU convolves [x_t, h] per step in its forward (no chunks): the split form
# is forced (the Triton path always runs it).
_SPLIT_BACKENDS = [pytest.param("torch", id="torch-split"), "triton"]


def _force_split(monkeypatch, backend):
    if backend == "torch":
        monkeypatch.setattr(sequence, "cat_convs", lambda spec, x: False)


@pytest.mark.parametrize("backend", _SPLIT_BACKENDS)
def test_chunked_inference_forward_equals_whole_sequence(monkeypatch, backend):
    """Inference convolves the input in chunks of steps (a temporary, bounded by CHUNK_BYTES)."""
    _force_split(monkeypatch, backend)
    x, st = _inputs(t=_CHUNK_T)
    m = _model(backend)
    with torch.no_grad():
        outs, last = m(x, st)
        seen = _chunk_spy(monkeypatch)
        outs_c, last_c = m(x, st)
    _assert_chunked(seen)
    got = list(outs_c) + [t for pair in last_c for t in pair]
    want = list(outs) + [t for pair in last for t in pair]
    for i, (a, b) in enumerate(zip(got, want)):
        assert _rel(a, b) < 1e-5, (i, _rel(a, b))


@pytest.mark.parametrize("backend", _SPLIT_BACKENDS)
def test_chunked_recomputed_gates_training_equals_saved_gates(monkeypatch, backend):
    """recompute_gates: the forward's input convolution and the backward's recomputation run in
    chunks of steps; outputs and every gradient as the unchunked run with saved gates."""
    _force_split(monkeypatch, backend)
    x, st = _inputs(t=_CHUNK_T)
    whole = _run(_model(backend), x, st)
    seen = _chunk_spy(monkeypatch)
    chunked = _run(_model(backend, recompute_gates=True), x, st)
    _assert_chunked(seen)
    assert len(chunked) == len(whole)
    for i, (a, b) in enumerate(zip(chunked, whole)):
        # Weight gradients are summed per chunk, then over chunks: same values, other order.
        assert _rel(a, b) < 1e-5, (i, _rel(a, b))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunked_op_backward_with_retain_graph_equals_whole_sequence(monkeypatch, backend):
    """Saved gates without gate_buffer's mark (a saved-tensor hook's copy, say) are never
    overwritten by the custom op's backward: its gate gradients go to a buffer of a chunk of
    steps, reused chunk after chunk; twice (retain_graph) the same."""
    from triton_convlstm import gate_buffer

    monkeypatch.setattr(gate_buffer, "claim", lambda gates: None)

    def grads():
        args = _op_args(t=_CHUNK_T)
        args[7] = backend
        h_seq, c_last, _, _ = layer_forward_op(*args)
        loss = (h_seq**2).sum() + c_last.sum()
        leaves = [a for a in args[:6] if isinstance(a, torch.Tensor)]
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        second = torch.autograd.grad(loss, leaves)
        return [h_seq.detach(), c_last.detach(), *first], second

    whole, _ = grads()
    seen = _chunk_spy(monkeypatch, 2 * (2 * 12 * 5 * 4 * 4))  # two steps: B2 4*hid3 5x4 fp32
    first, second = grads()
    _assert_chunked(seen)
    for i, (a, b, c) in enumerate(zip(first[2:], second, whole[2:])):
        assert _rel(a, c) < 1e-5, (i, _rel(a, c))
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for a, c in zip(first[:2], whole[:2]):
        assert _rel(a, c) < 1e-5


def test_float64_runs_the_torch_path_under_auto():
    from triton_convlstm.backend import resolve_backend

    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "torch"
    assert resolve_backend("triton", torch.device("cuda"), torch.float64) == "torch"


@pytest.mark.parametrize("loss", ["square", "sum"])
def test_double_backward_is_a_clear_error(loss):
    """Both ways in: a loss whose gradient requires grad, and a .sum(), whose does not (that
    one came back silently non-differentiable)."""
    m = _model("torch")
    x, st = _inputs()
    outs, _ = m(x, st)
    out = outs[1].square().sum() if loss == "square" else outs[1].sum()
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(out, x, create_graph=True)
    (gx,) = torch.autograd.grad(outs[1].sum(), x)  # first order still works
    assert torch.isfinite(gx).all()


def test_returned_tensors_are_contiguous_like_the_popular_module():
    m = _model("torch")
    x, st = _inputs()
    outs, last = m(x, st)
    for o in outs:
        assert o.is_contiguous()
        o.view(o.shape[0], -1)  # code written for the popular module does this
    for h, c in last:
        assert h.is_contiguous() and c.is_contiguous()


def test_kernel_size_list_of_two_suggests_a_tuple():
    with pytest.raises(ValueError, match=r"kernel_size: .*pass a tuple: \(3, 3\)"):
        ConvLSTM(2, 4, [3, 3], 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_second_backward_with_retain_graph_equals_the_first(backend):
    """The backward overwrites the saved gates with their gradients; a second backward through
    the same forward (retain_graph=True, e.g. two losses) must recompute them, not read them."""
    m = _model(backend)
    x, st = _inputs()
    outs, last = m(x, st)
    loss = sum((o ** 2).sum() for o in outs) + last[-1][1].sum()
    leaves = [x] + list(m.parameters())
    first = torch.autograd.grad(loss, leaves, retain_graph=True)
    second = torch.autograd.grad(loss, leaves, retain_graph=True)
    third = torch.autograd.grad(loss, leaves)
    for a, b, c in zip(first, second, third):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_forward_keeps_gates_in_the_input_convolution_output(backend, monkeypatch,
                                                                      conv_outputs):
    """Where dtypes agree, z_seq is the input convolution's output itself (one (T, B, 4*hid)
    buffer in training, not two) and has the strides the fake kernel promises."""
    from triton_convlstm.layout import empty_seq
    from triton_convlstm.sequence import LayerSpec, layer_forward

    # The split path (the torch path on CPU would otherwise convolve [x_t, h] per step).
    monkeypatch.setattr(sequence, "cat_convs", lambda spec, x: False)
    convs = conv_outputs
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 3, 5, 6, generator=g).to(DEVICE)
    w = torch.randn(4 * 5, 3 + 5, 3, 3, generator=g).to(DEVICE)
    bias = torch.randn(4 * 5, generator=g).to(DEVICE)
    spec = LayerSpec((1, 1), backend)
    h_seq, c_last, c_seq, z_seq = layer_forward(x, w, bias, None, None, None, spec, True)
    assert z_seq.stride() == empty_seq(4, 2, 20, 5, 6, dtype=x.dtype, device="meta").stride()
    assert z_seq.untyped_storage().nbytes() == z_seq.numel() * z_seq.element_size()
    # The input convolution (the one over all T*B frames) wrote z_seq: no fresh buffer.
    (zx_all,) = [c for c in convs if c.shape[0] == 4 * 2]
    assert z_seq.untyped_storage().data_ptr() == zx_all.untyped_storage().data_ptr()
    # Same values as inference (which keeps nothing and chunks its input convolution).
    h_inf, c_inf, _, _ = layer_forward(x, w, bias, None, None, None, spec, False)
    torch.testing.assert_close(h_seq, h_inf, rtol=0, atol=0)
    torch.testing.assert_close(c_last, c_inf, rtol=0, atol=0)


def test_second_backward_reruns_the_forward_only_when_gates_were_overwritten(monkeypatch):
    """With recomputed gates nothing saved is overwritten: a retain_graph backward must not pay
    for a forward again; with saved gates (overwritten by the first backward) it must."""
    import triton_convlstm.layer_op as layer_op

    calls = []
    real = layer_op.layer_forward
    monkeypatch.setattr(layer_op, "layer_forward", lambda *a: calls.append(1) or real(*a))
    for recompute, reruns in ((True, 0), (False, 2)):  # two layers
        m = _model("torch", recompute_gates=recompute)
        x, st = _inputs()
        outs, _ = m(x, st)
        loss = sum(o.square().sum() for o in outs)
        torch.autograd.grad(loss, x, retain_graph=True)
        calls.clear()
        torch.autograd.grad(loss, x)
        assert len(calls) == reruns, recompute


def test_cpu_keeps_3d_frames_channels_first_and_the_rest_channels_last():
    """layout.frames_channels_last: on CPU a 3-d sequence's buffers are contiguous (torch's CPU
    conv3d copies channels-last inputs), 1-d and 2-d ones channels-last; on other devices
    (meta stands for CUDA here) every one is channels-last."""
    from triton_convlstm.layout import empty_seq, frames_channels_last
    from triton_convlstm.sequence import LayerSpec, layer_forward

    for dims, spatial in ((1, (7,)), (2, (4, 5)), (3, (3, 4, 5))):
        seq = empty_seq(2, 3, 6, *spatial, dtype=torch.float32, device="cpu")
        assert (seq.stride(2) == 1) == (dims != 3), dims
        assert frames_channels_last("meta", dims)
        like_cuda = empty_seq(2, 3, 6, *spatial, dtype=torch.float32, device="meta")
        assert like_cuda.stride(2) == 1
    # The fake kernels see the real device, so their strides are the loops'.
    x = torch.randn(2, 3, 2, 3, 4, 5)
    w = torch.randn(12, 5, 3, 3, 3)
    h_seq, *_ = layer_forward(x, w, None, None, None, None, LayerSpec((1, 1, 1), "torch"), False)
    assert h_seq.is_contiguous()


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 1, 1), (2, 0, 3, 4), (3, 5, 1, 7, 2),
                                   (2, 3, 6, 7), (4, 1, 8, 1, 1), (1, 2, 3), (2, 3, 4, 5, 6)])
def test_layout_strides_are_computed_as_torch_allocates_them(shape):
    """layout._moved_strides (channels_last's and in_seq_layout's check, allocation-free) gives
    the strides torch gives the allocation it describes, size-0 and size-1 dims included: the
    layout checks compare strides exactly."""
    from triton_convlstm.layout import _moved_strides, channels_last, empty_seq, in_seq_layout

    for to in range(len(shape)):
        rest = [*shape[:to], *shape[to + 1:], shape[to]]
        assert _moved_strides(shape, to) == torch.empty(rest).movedim(-1, to).stride()
    t = torch.randn(shape)
    cl = channels_last(t)  # t itself where torch calls it channels-last already (size-1 dims)
    assert torch.equal(cl, t) and (cl is t or cl.stride() == _moved_strides(shape, 1))
    assert channels_last(cl) is cl
    if len(shape) >= 4:
        for device in ("cpu", "meta"):
            seq = empty_seq(*shape, dtype=torch.float32, device=device)
            assert in_seq_layout(seq)
    if len(shape) == 5 and min(shape) > 1:  # 2-d frames: channels-last on CPU, exactly
        assert not in_seq_layout(torch.empty(shape))
