"""One model called from several threads at once, with CUDA graphs (emulated on CPU).

A captured entry's static buffers serve every call with its signature: without mutual exclusion
a second thread's copy-in could land between the first thread's copy-in and its replay, and the
first would silently get the second's result (a web server's thread pool sharing one model)."""

import contextlib
import threading
import time

import pytest
import torch

from triton_convlstm import ConvLSTM, graphs


@pytest.fixture
def device(graph_device):  # conftest: CUDA with real graphs, CPU with emulated ones
    return graph_device


def _model(device):
    torch.manual_seed(0)
    return ConvLSTM(3, [6, 4], 3, 2, batch_first=True, peephole=True).to(device)


def _inputs(device, n):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(2, 5, 3, 6, 6, generator=g).to(device) for _ in range(n)]


def _infer(m, x):
    with torch.no_grad():
        outs, last = m(x)
    return [outs[0], *last[0]]


def _train(m, x):
    x = x.clone().requires_grad_()
    outs, last = m(x)
    loss = (outs[0] ** 2).mean() + last[0][1].mean()
    return list(torch.autograd.grad(loss, [x, *m.parameters()]))


def test_a_call_paused_between_copy_in_and_replay_keeps_its_inputs(monkeypatch):
    """Thread A pauses inside its (emulated) replay until thread B has started a call with
    other data on the same entry; A must still get A's result."""
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    m = _model("cpu")
    xa, xb = _inputs("cpu", 2)
    want_a, want_b = _infer(m, xa), _infer(m, xb)
    for _ in range(2):  # capture the entries
        _infer(m, xa)
    a_replaying, b_started = threading.Event(), threading.Event()
    original = graphs.GraphEntry.replay

    def replay(self, args, keep=()):
        if threading.current_thread().name != "A" or a_replaying.is_set():
            return original(self, args, keep)
        compute = self.fn

        def paused(*a):  # after A's copy-in, before the (emulated) graph runs
            a_replaying.set()
            b_started.wait(timeout=5)
            time.sleep(0.2)  # B's copy-in lands now, unless B has to wait for A
            return compute(*a)

        self.fn = paused
        try:
            return original(self, args, keep)
        finally:
            self.fn = compute

    monkeypatch.setattr(graphs.GraphEntry, "replay", replay)
    got = {}

    def run_b():
        a_replaying.wait(timeout=5)
        b_started.set()
        got["B"] = _infer(m, xb)

    threads = [threading.Thread(target=lambda: got.__setitem__("A", _infer(m, xa)), name="A"),
               threading.Thread(target=run_b, name="B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    graphs.clear()
    assert a_replaying.is_set() and b_started.is_set()
    for key, want in (("A", want_a), ("B", want_b)):
        for a, b in zip(got[key], want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_backward_does_not_unpack_while_another_thread_updates_the_buffers(monkeypatch):
    """Thread B pauses inside a replay's in-place update of the shared buffers (whose version
    counters are restored only at the end of it) while thread A runs its backward: A must
    wait, not see a bumped version ("modified by an inplace operation")."""
    monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    m = _model("cpu")
    xa, xb = _inputs("cpu", 2)
    want = _train(m, xa)
    for _ in range(2):  # capture the entries
        _train(m, xa)
    b_in_window, a_done = threading.Event(), threading.Event()
    preserve = torch.autograd._unsafe_preserve_version_counter

    @contextlib.contextmanager
    def slow_preserve(t):
        with preserve(t):
            yield
            # The pause on the last layer's saved gates (T, B, 4*4, H, W): the first buffers
            # A's backward reads from the shared ones.
            if (threading.current_thread().name == "B" and not b_in_window.is_set()
                    and t.dim() == 5 and t.shape[2] == 16):
                b_in_window.set()
                a_done.wait(timeout=0.5)  # A runs its backward now, unless it must wait for B

    x = xa.clone().requires_grad_()
    outs, last = m(x)  # A's forward, on this thread
    loss = (outs[0] ** 2).mean() + last[0][1].mean()
    monkeypatch.setattr(torch.autograd, "_unsafe_preserve_version_counter", slow_preserve)
    thread_b = threading.Thread(target=lambda: _train(m, xb), name="B")
    thread_b.start()
    assert b_in_window.wait(timeout=10)
    try:
        got = torch.autograd.grad(loss, [x, *m.parameters()])
    finally:
        a_done.set()
        thread_b.join(timeout=30)
        graphs.clear()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [_infer, _train], ids=["inference", "training"])
def test_threads_sharing_a_model_get_their_own_results(device, step):
    m = _model(device)
    xs = _inputs(device, 4)
    want = [step(m, x) for x in xs]  # one thread, first calls: eager, then captures
    want = [step(m, x) for x in xs]
    errors, results = [], {}

    def worker(i):
        try:
            for r in range(6):
                results[(i, r)] = step(m, xs[i])
        except Exception as exc:  # surfaced below: an assert in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for (i, _), got in results.items():
        for a, b in zip(got, want[i]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
