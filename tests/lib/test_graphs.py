"""CUDA-graph replay of whole time loops. On a GPU the real graphs; on CPU the same cache with
an emulated graph (graphs.EMULATE_ON_CPU), so its copy-in / clone-out logic is tested in CI."""

import contextlib
import warnings

import pytest
import torch

from triton_convlstm import ConvLSTM, graphs


@pytest.fixture
def device(graph_device):  # conftest: CUDA with real graphs, CPU with emulated ones
    return graph_device


def _pair(dtype=torch.float32, peephole=True, device="cuda", **kw):
    torch.manual_seed(3)
    eager = ConvLSTM(4, [8, 6], 3, 2, batch_first=True, peephole=peephole,
                     return_all_layers=True, cuda_graphs=False, **kw)
    if peephole:
        with torch.no_grad():
            for cell in eager.cell_list:
                cell.peephole.normal_(0, 0.5)
    graphed = ConvLSTM(4, [8, 6], 3, 2, batch_first=True, peephole=peephole,
                       return_all_layers=True, cuda_graphs=True, **kw)
    graphed.load_state_dict(eager.state_dict())
    return eager.to(device, dtype), graphed.to(device, dtype)


def _step(m, x, train=True):
    if not train:
        with torch.no_grad():
            outs, last = m(x)
        return [o.clone() for o in outs] + [t.clone() for pair in last for t in pair]
    x = x.clone().requires_grad_()
    outs, last = m(x)
    loss = sum((o.float() ** 2).mean() for o in outs) + last[-1][1].mean()
    grads = torch.autograd.grad(loss, [x] + list(m.parameters()))
    return [o.detach() for o in outs] + list(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("train", [False, True], ids=["fwd", "train"])
def test_replay_equals_eager_with_fresh_data(device, dtype, train):
    eager, graphed = _pair(dtype, device=device)
    before = graphs.FORWARD.captures, graphs.BACKWARD.captures  # counters are process-wide
    for call in range(4):  # eager warm-up, capture, then replays
        x = torch.randn(3, 5, 4, 12, 10, device=device, dtype=dtype)
        want = _step(eager, x, train)
        got = _step(graphed, x, train)
        for a, b in zip(got, want):
            assert torch.isfinite(a).all()
            # cuDNN's weight-gradient algorithms may sum in any order: exact only without them.
            tol = dict(rtol=0, atol=0) if not train else {}
            torch.testing.assert_close(a, b, **tol, msg=f"call {call}")
    assert graphs.FORWARD.captures > before[0]
    if train:
        assert graphs.BACKWARD.captures > before[1]


def test_replay_with_recomputed_gates_equals_eager(device):
    eager, graphed = _pair(device=device, recompute_gates=True)
    before = graphs.BACKWARD.captures
    for call in range(4):
        x = torch.randn(3, 5, 4, 12, 10, device=device)
        for a, b in zip(_step(graphed, x), _step(eager, x)):
            torch.testing.assert_close(a, b, msg=f"call {call}")
    assert graphs.BACKWARD.captures > before


def test_shape_change_recaptures_and_outputs_are_not_overwritten(device):
    eager, graphed = _pair(device=device)
    xs = [torch.randn(3, 5, 4, 12, 10, device=device) for _ in range(3)]
    keep = [_step(graphed, x, train=False) for x in xs]  # held while later replays run
    before = graphs.FORWARD.captures
    x_other = torch.randn(2, 7, 4, 9, 11, device=device)
    for _ in range(3):
        _step(graphed, x_other, train=False)
    assert graphs.FORWARD.captures > before
    for x, held in zip(xs, keep):
        for a, b in zip(held, _step(eager, x, train=False)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_two_forwards_then_one_backward(device):
    """Saved activations of the first call must survive the second call's replay."""
    eager, graphed = _pair(device=device)
    for _ in range(2):  # warm up and capture
        _step(graphed, torch.randn(3, 5, 4, 12, 10, device=device))
    # Three times: the first such step also captures the backward; the later ones replay it.
    for call in range(3):
        x1, x2 = (torch.randn(3, 5, 4, 12, 10, device=device) for _ in range(2))
        losses = []
        for m in (eager, graphed):
            m.zero_grad()
            loss = m(x1)[0][-1].pow(2).mean() + m(x2)[0][-1].pow(2).mean()
            loss.backward()
            losses.append([p.grad.clone() for p in m.parameters()])
        for a, b in zip(*losses):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"call {call}")


@pytest.mark.gpu
def test_training_is_deterministic(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    _, graphed = _pair(torch.bfloat16)
    x = torch.randn(3, 5, 4, 12, 10, device="cuda", dtype=torch.bfloat16)
    runs = [_step(graphed, x) for _ in range(4)]
    for a, b in zip(runs[-1], runs[-2]):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_torch_compile_fullgraph(mode):
    torch._dynamo.reset()
    eager, graphed = _pair()
    compiled = torch.compile(graphed, fullgraph=True, mode=mode)
    for _ in range(3):
        x = torch.randn(3, 5, 4, 12, 10, device="cuda")
        want = _step(eager, x)
        got = _step(compiled, x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_autocast_bf16_matches_bf16_model():
    eager, _ = _pair(peephole=False)
    x = torch.randn(3, 5, 4, 12, 10, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs, last = eager(x)
    assert outs[-1].dtype == torch.bfloat16 and last[-1][1].dtype == torch.float32
    ref = eager.to(torch.bfloat16)(x.bfloat16())[0][-1]
    torch.testing.assert_close(outs[-1], ref, rtol=0, atol=0)


def test_capture_under_inference_mode_then_no_grad(monkeypatch):
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    eager, graphed = _pair(device="cpu")
    x = torch.randn(3, 5, 4, 12, 10)
    with torch.inference_mode():
        for _ in range(3):  # warm-up, capture, replay: all under inference_mode
            graphed(x)
    with torch.no_grad():  # replays into the same static buffers outside inference_mode
        got = graphed(x)[0][-1]
        want = eager(x)[0][-1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    graphs.clear()


def test_too_many_signatures_stop_capturing_with_a_warning(monkeypatch):
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    monkeypatch.setattr(graphs.FORWARD, "max_entries", 2)
    eager, graphed = _pair(device="cpu", peephole=False)
    shapes = [(2, 3, 4, 6 + i, 5) for i in range(5)]
    before = graphs.FORWARD.captures
    with torch.no_grad(), pytest.warns(UserWarning, match="signatures are in rotation"):
        for _ in range(4):
            for shape in shapes:
                x = torch.randn(shape)
                torch.testing.assert_close(graphed(x)[0][-1], eager(x)[0][-1], rtol=0, atol=0)
    # 10 signatures (5 shapes x 2 layers), 40 calls: capturing stops once 3 entries were evicted
    assert graphs.FORWARD.captures - before <= 5
    graphs.clear()


def test_changing_cudnn_flags_recaptures(monkeypatch):
    """A capture bakes in algorithm choices: cudnn.deterministic etc. are part of the key."""
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    _, graphed = _pair(device="cpu", peephole=False)
    x = torch.randn(2, 3, 4, 6, 5)
    with torch.no_grad():
        for _ in range(3):
            graphed(x)
        before = graphs.FORWARD.captures
        monkeypatch.setattr(torch.backends.cudnn, "deterministic",
                            not torch.backends.cudnn.deterministic)
        for _ in range(3):
            graphed(x)
    assert graphs.FORWARD.captures > before
    graphs.clear()


def test_backward_graph_reads_the_forward_buffers_without_copies(monkeypatch):
    """Training with graphs: saved z and c are neither cloned out of the forward entry nor
    copied into the backward's; the backward entry holds the very same tensors."""
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    eager, graphed = _pair(device="cpu")
    for _ in range(3):
        x = torch.randn(3, 5, 4, 12, 10)
        for a, b in zip(_step(graphed, x), _step(eager, x)):
            torch.testing.assert_close(a, b)
    forward = [e for k, e in graphs.FORWARD.entries.items() if k[0][1]]  # save=True entries
    bound = [e for k, e in graphs.BACKWARD.entries.items()  # keyed on a forward entry
             if any(isinstance(part, graphs.GraphEntry) for part in k[0])]
    assert forward and bound
    for b in bound:
        f = next(f for f in forward if any(t is f.static_outputs[3] for t in b.static_inputs))
        assert b.static_inputs[10] is f.static_outputs[3]
        assert b.static_inputs[9] is f.static_outputs[2]
    graphs.clear()


def test_second_backward_with_retain_graph_equals_the_first(device):
    """The backward graph overwrites the forward entry's saved gates with their gradients; a
    second backward through the same forward must replay the forward first."""
    eager, graphed = _pair(device=device)
    for call in range(3):  # uncaptured, capture, replay
        x = torch.randn(3, 5, 4, 12, 10, device=device, requires_grad=True)
        grads = []
        for m in (eager, graphed):
            outs, last = m(x)
            loss = sum((o ** 2).mean() for o in outs) + last[-1][1].mean()
            leaves = [x] + list(m.parameters())
            grads.append(torch.autograd.grad(loss, leaves, retain_graph=True))
            grads.append(torch.autograd.grad(loss, leaves))
        want = grads[0]
        for got in grads[1:]:
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, msg=f"call {call}")


def test_static_inputs_are_kept_in_the_sequence_layout(device):
    """The per-call copy into a captured loop's static x (and gradient of h) also converts it to
    the layout the loop reads, so the loop itself makes no second copy."""
    from triton_convlstm.layout import empty_seq

    _, graphed = _pair(device=device)
    for _ in range(3):
        _step(graphed, torch.randn(3, 5, 4, 12, 10, device=device), train=True)
    statics = [e.static_inputs[0] for cache in (graphs.FORWARD, graphs.BACKWARD)
               for e in cache.entries.values() if isinstance(e.static_inputs[0], torch.Tensor)]
    assert len(statics) >= 3  # the two layers' forwards, at least one backward
    for t in statics:
        assert t.stride() == empty_seq(*t.shape, dtype=t.dtype, device="meta").stride()


@pytest.mark.parametrize("train", [False, True], ids=["fwd", "train"])
def test_returned_tensors_survive_later_replays_even_where_layouts_coincide(device, train):
    """The last layer (and every layer in inference) hands back the capture's own buffers and
    the module copies them. At 1x1 frames channels_last is also contiguous, where
    ``.contiguous()`` would have returned the capture's buffer itself."""
    torch.manual_seed(0)
    m = ConvLSTM(3, [4, 5], 3, 2, batch_first=True, return_all_layers=True).to(device)
    xs = [torch.randn(1, 3, 3, 1, 1, device=device) for _ in range(4)]

    def returned(x):  # exactly what the module returns, not copies of it
        with torch.set_grad_enabled(train):
            outs, last = m(x.requires_grad_(train))
        return [t.detach() for t in outs + [t for pair in last for t in pair]]

    held = [returned(x) for x in xs]  # each call after the first two replays
    snapshots = [[t.clone() for t in ts] for ts in held]
    returned(torch.randn(1, 3, 3, 1, 1, device=device))
    for got, want in zip(held, snapshots):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_frozen_first_layer_output_saved_by_the_next_is_not_overwritten(device):
    """A layer that saves nothing may still feed one that saves its input: that input must not
    be a capture's buffer, which a second forward would overwrite before the backward."""
    eager, graphed = _pair(device=device, peephole=False)
    for m in (eager, graphed):
        m.cell_list[0].requires_grad_(False)
    for call in range(3):
        x1, x2 = (torch.randn(3, 5, 4, 12, 10, device=device) for _ in range(2))
        grads = []
        for m in (eager, graphed):
            loss1 = m(x1)[0][-1].square().mean()
            m(x2)  # replays the first layer's capture with other data
            grads.append(torch.autograd.grad(loss1, list(m.cell_list[1].parameters())))
        for a, b in zip(*grads):
            torch.testing.assert_close(b, a, msg=f"call {call}")


@contextlib.contextmanager
def _conv_rnn_precision(conv: str, rnn: str):
    """cuDNN's per-op TF32 flags set, and restored after (monkeypatch cannot undo these)."""
    cudnn = torch.backends.cudnn
    saved = cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = conv, rnn
    try:
        yield
    finally:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved


def test_tf32_set_through_the_newer_api_alone(device):
    """A user who sets only cudnn.conv.fp32_precision leaves the RNN flag as it was, and the
    legacy cudnn.allow_tf32 then raises when read: the captured path must not read it (it
    did, per call, for the cache key), and the key must follow the convolution's flag."""
    from triton_convlstm.backend import cudnn_conv_tf32

    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("this torch has no per-op TF32 flags (the newer API)")
    with _conv_rnn_precision("ieee", "tf32"):
        with pytest.raises(RuntimeError):
            torch.backends.cudnn.allow_tf32  # noqa: B018  (the mixed state this test is about)
        assert cudnn_conv_tf32() is False
        eager, graphed = _pair(device=device)
        x = torch.randn(3, 5, 4, 12, 10, device=device)
        want = _step(eager, x)
        for _ in range(3):  # warm-up, capture, replay
            got = _step(graphed, x)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        flags = graphs._backend_flags()
    with _conv_rnn_precision("tf32", "ieee"):
        assert cudnn_conv_tf32() is True and graphs._backend_flags() != flags


def test_a_collected_module_drops_its_captured_loops(device):
    """Training keeps a module's saved activations in its own forward entry, which the backward
    entries read: when the module goes, both go with it (their buffers freed), and a new module
    that happens to get the same id does not find them."""
    import gc

    _, graphed = _pair(device=device)
    x = torch.randn(3, 5, 4, 12, 10, device=device)
    for _ in range(3):  # warm-up, capture, replay
        _step(graphed, x)
    owned = [e for e in graphs.FORWARD.entries.values() if e.owner is not None]
    assert len(owned) == 2 and len(graphs.BACKWARD.entries) == 2  # one of each per layer
    slots = {e.owner for e in owned}
    assert slots == {graphs.slot_of(cell) for cell in graphed.cell_list}
    del graphed, owned
    gc.collect()
    graphs.release_collected()  # (the next graph call would do it too)
    assert not any(e.owner in slots for e in graphs.FORWARD.entries.values())
    assert not graphs.BACKWARD.entries
    assert not any(own in slots for own in graphs.FORWARD.seen.values())
    # The cache still works for a new model (its first call runs eagerly, then it captures).
    _, again = _pair(device=device)
    for _ in range(3):
        _step(again, x)
    assert len(graphs.BACKWARD.entries) == 2


@pytest.mark.gpu
def test_captures_on_a_second_gpu_replay_its_work():
    """After a capture on cuda:0, a model on cuda:1 must capture on cuda:1 (torch's default
    capture stream lives on the first capture's device): replays with fresh data must give
    fresh results, equal to the uncaptured model's."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    _, first = _pair(device="cuda:0")
    for _ in range(3):
        _step(first, torch.randn(3, 5, 4, 12, 10, device="cuda:0"))
    eager, graphed = _pair(device="cuda:1")
    for train in (False, True):
        for call in range(4):
            x = torch.randn(3, 5, 4, 12, 10, device="cuda:1")
            for a, b in zip(_step(graphed, x, train), _step(eager, x, train)):
                torch.testing.assert_close(a, b, msg=f"train={train} call {call}")


def test_an_evicted_forward_entry_takes_its_backward_entries_along(monkeypatch):
    """Backward entries (and first-call keys) hold the forward entry whose buffers they read:
    left behind, they would keep an evicted entry's static buffers alive."""
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    monkeypatch.setattr(graphs.FORWARD, "max_entries", 2)
    _, graphed = _pair(device="cpu", peephole=False)
    for shape in [(2, 3, 4, 6 + i, 5) for i in range(2)]:  # 4 entries: 2 evicted
        x = torch.randn(shape)
        for _ in range(3):  # warm-up, capture, replay: forward and backward entries
            _step(graphed, x)
    assert graphs.FORWARD.evictions > 0
    live = set(map(id, graphs.FORWARD.entries.values()))
    held = set(map(id, _forward_entries_in_backward_keys()))
    assert held and held <= live
    graphs.clear()


def test_moving_on_from_well_used_shapes_is_not_thrashing(monkeypatch):
    """Evicting entries that were replayed many times (a sweep over sizes, models made one
    after another) must not turn capturing off for good; only entries never reused count."""
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    monkeypatch.setattr(graphs.FORWARD, "max_entries", 2)
    _, graphed = _pair(device="cpu", peephole=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no "signatures are in rotation" warning
        for i in range(6):  # 6 shapes x 2 layers, one after another, each used 4 times
            x = torch.randn(2, 3, 4, 6 + i, 5)
            before = graphs.FORWARD.captures
            for _ in range(4):
                graphed(x)
            assert graphs.FORWARD.captures - before == 2, i  # both layers captured anew
    assert graphs.FORWARD.evictions > graphs.FORWARD.max_entries
    assert not graphs.FORWARD.thrashing()
    graphs.clear()


@pytest.mark.parametrize("train", [False, True], ids=["fwd", "train"])
def test_graphs_off_and_layers_past_the_size_limit_capture_nothing(monkeypatch, train):
    """cuda_graphs=False captures nothing; with it on, a layer whose state per step exceeds
    MAX_STATE_ELEMENTS runs uncaptured while a smaller one in the same model is captured."""
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    x = torch.randn(3, 5, 4, 12, 10)  # layer states: 3*8*12*10 = 2880 and 3*6*12*10 = 2160
    off, on = _pair(device="cpu", peephole=False)  # cuda_graphs=False, True
    before = graphs.FORWARD.captures, graphs.BACKWARD.captures
    for _ in range(3):
        _step(off, x, train)
    assert (graphs.FORWARD.captures, graphs.BACKWARD.captures) == before
    monkeypatch.setattr(graphs, "MAX_STATE_ELEMENTS", 2500)  # the first layer is past it
    for _ in range(3):
        _step(on, x, train)
    assert graphs.FORWARD.captures == before[0] + 1  # the second layer's loop alone
    assert graphs.BACKWARD.captures == before[1] + train
    graphs.clear()


def test_first_calls_remembered_are_bounded(monkeypatch):
    """A process meeting ever new shapes must not grow the cache's memory of first calls for
    ever; a forgotten signature that comes back runs uncaptured once more, then is captured."""
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    monkeypatch.setattr(graphs.FORWARD, "max_seen", 3)
    m = ConvLSTM(2, 3, 3, 1)
    before = graphs.FORWARD.captures
    with torch.no_grad():
        for i in range(6):  # six one-off shapes
            m(torch.randn(2, 1, 2, 4 + i, 5))
        assert len(graphs.FORWARD.seen) == 3 and graphs.FORWARD.captures == before
        x = torch.randn(2, 1, 2, 4, 5)  # the first shape again: forgotten, so a first call
        m(x)
        assert graphs.FORWARD.captures == before
        m(x)
        assert graphs.FORWARD.captures == before + 1
    graphs.clear()


def test_a_module_collected_mid_iteration_is_dropped_later(device):
    """The collector may free a module while this thread loops over a cache: its finalizer only
    takes note, and the next call into the cache drops the module's entries."""
    import gc

    _, graphed = _pair(device=device)
    x = torch.randn(3, 5, 4, 12, 10, device=device)
    for _ in range(3):
        _step(graphed, x)
    slots = {graphs.slot_of(cell) for cell in graphed.cell_list}
    del graphed
    gc.collect()
    entries = list(graphs.FORWARD.entries.values())  # nothing dropped yet, nothing mutated
    assert {e.owner for e in entries} >= slots
    _, other = _pair(device=device)
    _step(other, x)  # the next call into the cache
    assert not any(e.owner in slots for e in graphs.FORWARD.entries.values())
    assert not graphs.BACKWARD.entries


def test_shared_inference_captures_go_with_their_last_user(device):
    """Inference entries are shared by every module with the same signature: one module going
    leaves them to the other; when both are gone, so are they."""
    import gc

    first, second = _pair(device=device)  # same shapes: they share the inference entries
    second.cuda_graphs = first.cuda_graphs = True
    x = torch.randn(3, 5, 4, 12, 10, device=device)
    with torch.no_grad():
        for _ in range(3):
            first(x)
            second(x)
    shared = [e for e in graphs.FORWARD.entries.values() if e.users]
    assert len(shared) == 2 and all(len(e.users) == 2 for e in shared)  # one entry per layer
    del first
    gc.collect()
    graphs.release_collected()
    assert all(len(e.users) == 1 for e in shared)
    assert all(any(e is kept for kept in graphs.FORWARD.entries.values()) for e in shared)
    with torch.no_grad():
        second(x)  # still replays
    del second, shared
    gc.collect()
    graphs.release_collected()
    assert not any(e.users for e in graphs.FORWARD.entries.values())
    assert not graphs.FORWARD.entries


@pytest.mark.filterwarnings("ignore:triton_convlstm. more than")  # thrashing, on purpose
def test_a_hot_signature_is_captured_while_thrashing(monkeypatch):
    """Thrashing stops capturing new signatures, but one that keeps coming back (the workload
    settled on new shapes) is captured after HOT_CALLS uncaptured calls."""
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    monkeypatch.setattr(graphs.FORWARD, "max_entries", 2)
    eager, graphed = _pair(device="cpu", peephole=False)
    with torch.no_grad():
        for _ in range(2):
            for i in range(5):
                graphed(torch.randn(2, 3, 4, 6 + i, 5))
    assert graphs.FORWARD.thrashing()
    x = torch.randn(2, 3, 4, 20, 5)  # a new shape, from now on the only one
    with torch.no_grad():
        before = graphs.FORWARD.captures
        for _ in range(graphs.HOT_CALLS + 1):
            graphed(x)
        assert graphs.FORWARD.captures - before == 2  # both layers, once hot
        torch.testing.assert_close(graphed(x)[0][-1], eager(x)[0][-1], rtol=0, atol=0)
    graphs.clear()


def _forward_entries_in_backward_keys() -> list:
    """The forward entries the backward cache's keys (entries and first calls) hold."""
    keys = list(graphs.BACKWARD.entries) + list(graphs.BACKWARD.seen)
    return [p for k in keys for p in k[0] if isinstance(p, graphs.GraphEntry)]


def _captured_loss(device):
    """A graphed model captured in training, the eager twin's results for its next step, and
    that step's input and loss with its backward still to run."""
    eager, graphed = _pair(device=device)
    x = torch.randn(3, 5, 4, 12, 10, device=device)
    for _ in range(3):
        _step(graphed, x)
    want = _step(eager, x)
    xg = x.clone().requires_grad_()
    outs, last = graphed(xg)
    loss = sum((o.float() ** 2).mean() for o in outs) + last[-1][1].mean()
    return graphed, want, xg, loss


def test_a_backward_after_the_cache_was_cleared(device):
    graphed, want, xg, loss = _captured_loss(device)
    graphs.clear()  # between a forward and its backward
    got = torch.autograd.grad(loss, [xg] + list(graphed.parameters()))
    for a, b in zip(got, want[-len(got):]):
        torch.testing.assert_close(a, b)
    assert not _forward_entries_in_backward_keys()


def test_a_backward_after_its_module_was_collected(device):
    """A loss can outlive its model: the forward entry is dropped before the backward runs,
    which must still be right and must not make new cache keys that keep the entry alive."""
    import gc

    graphed, want, xg, loss = _captured_loss(device)
    params = list(graphed.parameters())
    del graphed
    gc.collect()
    graphs.release_collected()
    got = torch.autograd.grad(loss, [xg] + params)
    for a, b in zip(got, want[-len(got):]):
        torch.testing.assert_close(a, b)
    assert not any(e.dropped for e in _forward_entries_in_backward_keys())


def test_modules_without_captures_register_no_finalizer():
    before = len(graphs._WATCHED)
    for _ in range(3):
        m = ConvLSTM(2, 3, 3, 1, batch_first=True, backend="torch")  # CPU: nothing captured
        m(torch.randn(1, 2, 2, 4, 4))
    assert len(graphs._WATCHED) == before


def test_streaming_one_frame_a_call_replays_one_graph_per_layer(device):
    """Real-time use: T=1 chunks with the state carried. After the first calls (zero state,
    then the first given state: an uncaptured call and a capture each), every call replays
    one captured loop per layer and captures nothing; the results are the eager layer's."""
    eager, graphed = _pair(device=device)
    frames = torch.randn(2, 6, 4, 5, 5, device=device)
    state_e = state_g = None
    graphs.clear()
    with torch.no_grad():
        for t in range(frames.shape[1]):
            if t == 3:
                captures = graphs.FORWARD.captures
                replays = sum(e.replays for e in graphs.FORWARD.entries.values())
            out_e, state_e = eager(frames[:, t : t + 1], state_e)
            out_g, state_g = graphed(frames[:, t : t + 1], state_g)
            torch.testing.assert_close(out_g[-1], out_e[-1], rtol=1e-5, atol=1e-6)
    assert graphs.FORWARD.captures == captures  # nothing new from the 4th frame on
    now = sum(e.replays for e in graphs.FORWARD.entries.values())
    assert now - replays == 3 * 2  # three calls, two layers, one replay each
    for (h, c), (he, ce) in zip(state_g, state_e):
        torch.testing.assert_close(h, he, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, ce, rtol=1e-5, atol=1e-6)
