"""quick_step.py: the common one-frame CPU call skips the full checks. It must give the full
path's results bit for bit, be taken where it applies, and step aside (the full path, with
its errors, runs) wherever anything differs."""

import pytest
import torch
from family_oracle import CELLS, LAYERS
from torch import nn

from triton_convlstm import ConvLSTM, cells, modules, quick_step

SIZES = {1: (9,), 2: (5, 6), 3: (3, 4, 5)}


@pytest.fixture
def taken(monkeypatch):
    """How many steps the quick path computed."""
    count = {"n": 0}
    real = quick_step._step

    def spy(*args):
        count["n"] += 1
        return real(*args)

    monkeypatch.setattr(quick_step, "_step", spy)
    return count


def _full_cell(monkeypatch):
    monkeypatch.setattr(cells, "quick_cell_step", lambda *a: None)


def _full_layer(monkeypatch):
    monkeypatch.setattr(modules, "quick_layer_step", lambda *a: None)
    _full_cell(monkeypatch)


def _cell(n, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    cell = CELLS[n](2, 3, 3, **kw)
    if cell.peephole is not None:
        with torch.no_grad():
            cell.peephole.normal_()
    return cell.to(dtype)


def _state(cell, b, spatial, dtype):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(b, cell.hidden_dim, *spatial, generator=g).to(dtype)
    c = torch.randn(b, cell.hidden_dim, *spatial, generator=g).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    return h, c


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.is_contiguous()
        assert torch.equal(x, y)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("kw", [{}, {"peephole": True, "dilation": 2},
                                {"bias": False, "padding_mode": "replicate"}],
                         ids=["plain", "peephole-dilated", "nobias-replicate"])
def test_the_cell_step_equals_the_full_path(n, dtype, kw, taken, monkeypatch):
    cell = _cell(n, dtype, **kw)
    x = torch.randn(2, 2, *SIZES[n]).to(dtype)
    state = _state(cell, 2, SIZES[n], dtype)
    with torch.no_grad():
        quick = cell(x, state)
    assert taken["n"] == 1
    _full_cell(monkeypatch)
    with torch.no_grad():
        _assert_same(quick, cell(x, state))


def test_large_frames_channels_last_inside_and_contiguous_out(taken, monkeypatch):
    cell = _cell(2)
    x = torch.randn(1, 2, 40, 40)  # >= step_op.CHANNELS_LAST_PIXELS
    state = _state(cell, 1, (40, 40), torch.float32)
    quick = cell(x, state)
    assert taken["n"] == 1
    _full_cell(monkeypatch)
    _assert_same(quick, cell(x, state))


def test_gradients_flow_through_the_quick_cell_step(taken, monkeypatch):
    """Training a cell step by step takes the quick path too: same gradients."""
    grads = []
    for full in (False, True):
        if full:
            _full_cell(monkeypatch)
        cell = _cell(2, peephole=True)
        x = torch.randn(2, 2, 5, 6, generator=torch.Generator().manual_seed(3))
        h, c = cell(x, _state(cell, 2, (5, 6), torch.float32))
        (h.square().sum() + c.sum()).backward()
        grads.append([p.grad for p in cell.parameters()])
    assert taken["n"] == 1
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _hooked_conv(cell):
    cell.conv.register_forward_pre_hook(lambda *a: None)


def _conv_subclass(cell):
    class MyConv(nn.Conv2d):
        pass

    conv = MyConv(5, 12, 3, padding=1)
    conv.load_state_dict(cell.conv.state_dict())
    cell.conv = conv


def _reflect(cell):
    cell.conv.padding_mode = "reflect"


def _parametrized(cell):
    nn.utils.parametrizations.weight_norm(cell.conv)


def _plain_tensor_weight(cell):  # as torch.func tools and weight-sharing tricks leave it
    w = cell.conv.weight.detach().clone()
    del cell.conv.weight
    cell.conv.weight = w


def _own_conv_forward(cell):
    forward = cell.conv.forward
    cell.conv.forward = lambda x: forward(x)


def test_a_hook_on_the_cell_runs_around_the_quick_step(taken):
    """The cell's own hooks run in its __call__, around forward: the step inside is quick."""
    cell = _cell(2)
    seen = []
    cell.register_forward_hook(lambda mod, args, out: seen.append(out[0].shape))
    cell(torch.randn(2, 2, 5, 6), _state(cell, 2, (5, 6), torch.float32))
    assert taken["n"] == 1 and seen == [(2, 3, 5, 6)]


@pytest.mark.parametrize("change", [_hooked_conv, _conv_subclass, _reflect,
                                    _parametrized, _own_conv_forward, _plain_tensor_weight])
def test_the_cell_steps_aside_for_what_the_full_path_handles(change, taken):
    cell = _cell(2)
    change(cell)
    cell(torch.randn(2, 2, 5, 6), _state(cell, 2, (5, 6), torch.float32))
    assert taken["n"] == 0


def test_the_cell_steps_aside_under_global_hooks_autocast_and_without_a_state(taken):
    cell = _cell(2)
    x, state = torch.randn(2, 2, 5, 6), _state(cell, 2, (5, 6), torch.float32)
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        cell(x, state)
    finally:
        handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, _ = cell(x, state)
    assert h.dtype == torch.bfloat16
    cell(x)
    assert taken["n"] == 0
    cell(x, state)
    assert taken["n"] == 1


@pytest.mark.parametrize(("x", "state", "error", "match"), [
    (torch.randn(2, 3, 5, 6), None, ValueError, "input_tensor: expected 2 channels"),
    (torch.randn(2, 2, 5, 6).double(), None, TypeError, "input_tensor: expected dtype"),
    (torch.randn(2, 2, 5, 6), (torch.zeros(2, 3, 5, 7), torch.zeros(2, 3, 5, 7)), ValueError,
     "cur_state h: expected shape"),
    (torch.randn(2, 2, 5, 6), (torch.zeros(2, 3, 5, 6), torch.zeros(2, 3, 5, 6).double()),
     TypeError, "cur_state c: expected dtype"),
    (torch.randn(2, 2, 5, 6), [torch.zeros(2, 3, 5, 6)], TypeError, "cur_state: expected a pair"),
], ids=["channels", "dtype", "state-shape", "state-dtype", "not-a-pair"])
def test_bad_calls_still_get_the_full_paths_errors(x, state, error, match):
    cell = _cell(2)
    state = state if state is not None else _state(cell, 2, (5, 6), torch.float32)
    with pytest.raises(error, match=match):
        cell(x, state)


# ---------------------------------------------------------------------------------------------
# The layer on T=1 chunks


def _layer(n=2, **kw):
    torch.manual_seed(0)
    return LAYERS[n](2, [3, 4], 3, 2, **kw).eval()


def _chunks(model, n, state_given, b=2):
    x = torch.randn(b, 1, 2, *SIZES[n]) if model.batch_first else torch.randn(1, b, 2, *SIZES[n])
    state = None
    if state_given:
        state = [[t for t in _state(cell, b, SIZES[n], torch.float32)]
                 for cell in model.cell_list]
    return x, state


def _assert_same_returns(got, want):
    (outs, last), (outs_w, last_w) = got, want
    assert len(outs) == len(outs_w) and len(last) == len(last_w)
    _assert_same(outs, outs_w)
    for pair, pair_w in zip(last, last_w):
        assert isinstance(pair, list)
        _assert_same(pair, pair_w)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("all_layers", [True, False])
@pytest.mark.parametrize("state_given", [True, False], ids=["state", "zeros"])
def test_the_layer_on_one_frame_equals_the_full_path(n, batch_first, all_layers, state_given,
                                                     taken, monkeypatch):
    m = _layer(n, batch_first=batch_first, return_all_layers=all_layers, peephole=True)
    x, state = _chunks(m, n, state_given)
    with torch.no_grad():
        quick = m(x, state)
    assert taken["n"] == 2  # one step per layer
    assert quick[0][0].shape == (2, 1, 3 if all_layers else 4, *SIZES[n])
    _full_layer(monkeypatch)
    with torch.no_grad():
        _assert_same_returns(quick, m(x, state))


def test_outputs_do_not_share_memory_with_the_states(taken):
    m = _layer(return_all_layers=True)
    with torch.no_grad():
        outs, last = m(*_chunks(m, 2, True))
    assert taken["n"] == 2
    h = last[-1][0].clone()
    outs[-1].zero_()
    assert torch.equal(last[-1][0], h)


def test_a_stream_of_frames_equals_one_call_on_the_sequence():
    m = _layer(batch_first=True, return_all_layers=True)
    video = torch.randn(2, 5, 2, 5, 6)
    with torch.no_grad():
        whole, whole_last = m(video)
        state, outs = None, []
        for t in range(5):
            out, state = m(video[:, t : t + 1], state)
            outs.append(out)
    for layer in range(2):
        torch.testing.assert_close(torch.cat([o[layer] for o in outs], 1), whole[layer],
                                   rtol=1e-5, atol=1e-6)
        for a, b in zip(state[layer], whole_last[layer]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _LearnedStart(ConvLSTM):
    def _init_hidden(self, batch_size, image_size):
        states = super()._init_hidden(batch_size, image_size)
        return [[h + 1, c] for h, c in states]


def _dropout_in_training(m):
    m.dropout = 0.5
    m.train()


@pytest.mark.parametrize("case", ["grad", "two-steps", "lengths", "bidirectional", "dropout",
                                  "own-start", "cell-hook", "emulated-graphs"])
def test_the_layer_steps_aside_for_what_the_full_path_handles(case, taken, monkeypatch):
    from triton_convlstm import graphs

    kwargs = {"bidirectional": True} if case == "bidirectional" else {}
    m = (_LearnedStart(2, [3, 4], 3, 2) if case == "own-start" else _layer(**kwargs)).eval()
    x, state = _chunks(m, 2, case not in ("own-start", "bidirectional"))
    if case == "two-steps":
        x = torch.cat([x, x], 1 if m.batch_first else 0)
    if case == "dropout":
        _dropout_in_training(m)
    if case == "cell-hook":
        m.cell_list[1].register_forward_pre_hook(lambda *a: None)
    if case == "emulated-graphs":
        monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    with torch.set_grad_enabled(case == "grad"):
        m(x, state, lengths=[1, 1] if case == "lengths" else None)
    # With a hook on a cell the layer calls that cell as a module (step_by_step.py), whose
    # own forward may take the quick step (its hook runs around it): one step, that cell's.
    assert taken["n"] == (1 if case == "cell-hook" else 0)
    graphs.clear()
