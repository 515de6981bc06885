"""The layer inside the tools models are trained with: activation checkpointing (both
implementations) and torch.func.functional_call (exporting: test_export.py).

Checkpointing reruns the forward during the backward, which replays the layer's captured loops
again and can overwrite what an earlier call saved: the gradients must still be exact. On CPU
the graphs are emulated (graphs.EMULATE_ON_CPU), so the same replay logic runs in CI."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from triton_convlstm import ConvLSTM, graphs

MODES = [
    pytest.param(("cuda", True), marks=pytest.mark.gpu, id="cuda-graphs"),
    pytest.param(("cuda", False), marks=pytest.mark.gpu, id="cuda-nographs"),
    pytest.param(("cpu", True), id="cpu-emulated-graphs"),
    pytest.param(("cpu", False), id="cpu-nographs"),
]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    device, use_graphs = request.param
    if device == "cpu":
        monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    yield device, use_graphs
    graphs.clear()


def _model(device, use_graphs):
    torch.manual_seed(0)
    m = ConvLSTM(3, [5, 4], 3, 2, batch_first=True, peephole=True, return_all_layers=True,
                 cuda_graphs=use_graphs)
    with torch.no_grad():
        for cell in m.cell_list:
            cell.peephole.normal_(0, 0.5)
    return m.to(device)


def _flat(m):
    """The module as a function of x returning a flat tuple (what reentrant checkpointing
    tracks: it does not look into nested lists)."""
    def run(x):
        outs, last = m(x)
        return (*outs, *(t for pair in last for t in pair))
    return run


def _loss(flat_outputs):
    *outs, h1, c1, h2, c2 = flat_outputs
    return sum((o ** 2).mean() for o in outs) + c2.mean() + (h1 * c1).mean()


def _grads(m, run, *xs):
    # .backward(), not autograd.grad: reentrant checkpointing supports only the former.
    xs = [x.clone().requires_grad_() for x in xs]
    m.zero_grad(set_to_none=True)
    sum(_loss(run(x)) for x in xs).backward()
    return [t.grad for t in (*xs, *m.parameters())]


def _inputs(device, n=1):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 4, 3, 6, 5, generator=g).to(device) for _ in range(n)]


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_gives_the_same_gradients(mode, reentrant):
    m = _model(*mode)
    (x,) = _inputs(mode[0])
    for _ in range(3):  # the third call replays captured loops (first: eager, second: capture)
        want = _grads(m, _flat(m), x)
    got = _grads(m, lambda x: checkpoint(_flat(m), x, use_reentrant=reentrant), x)
    _assert_same(got, want)


def test_two_checkpointed_calls_of_one_module_in_one_loss(mode):
    """The second call's forward (and each recomputation) replays the same captured loops as
    the first: every backward must still read its own call's activations."""
    m = _model(*mode)
    xs = _inputs(mode[0], n=2)
    plain = _model(mode[0], False)
    want = _grads(plain, _flat(plain), *xs)
    for _ in range(3):
        got = _grads(m, lambda x: checkpoint(_flat(m), x, use_reentrant=False), *xs)
    _assert_same(got, want)


def test_functional_call_uses_the_given_parameters(mode):
    m = _model(*mode)
    (x,) = _inputs(mode[0])
    doubled = {name: 2 * p.detach() for name, p in m.named_parameters()}
    ref = _model(*mode)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(doubled[name])
    for _ in range(3):
        got = torch.func.functional_call(m, doubled, (x,))
    want = ref(x)
    _assert_same(got[0], want[0])
    _assert_same([t for pair in got[1] for t in pair], [t for pair in want[1] for t in pair])

