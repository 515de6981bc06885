"""Drop-in fidelity: the layer honours its modules as the popular module does.

Hooks (module, global, prune's, the hook-based spectral_norm), a cell subclass's forward and a
convolution that is not the plain one make the layer call its cells step by step
(step_by_step.py): compared here with the popular module in float64, hook calls and every
gradient included. Parametrizations stay on the fast path. Also: padding modes, meta tensors,
the drop-in switches and the state pairs' type.
"""

from __future__ import annotations

import copy

import pytest
import torch
from popular_convlstm import PopularConvLSTM
from reference_fp64 import convlstm, params_from_module, rel_err
from torch import nn
from torch.nn.utils import parametrize, prune

from triton_convlstm import ConvLSTM, ConvLSTMCell, modules

HID = [3, 4]


def _pair(seed=0, dtype=torch.float64):
    """The popular module and this layer with the same float64 weights, two layers, batch-first."""
    torch.manual_seed(seed)
    theirs = PopularConvLSTM(2, HID, (3, 3), 2, True, True, True).to(dtype)
    ours = ConvLSTM(2, HID, 3, 2, True, True, True, backend="torch").to(dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 2, 5, 6, dtype=dtype)
    return theirs, ours, x


def _close(a, b, tol=1e-10):
    assert rel_err(a, b) <= tol, rel_err(a, b)


def _run(model, x):
    outs, states = model(x)
    loss = sum((o * o).sum() for o in outs) + sum(c.sum() for _, c in states)
    loss.backward()
    return outs, states


def _same_run(theirs, ours, x):
    (o1, s1), (o2, s2) = _run(theirs, x), _run(ours, x)
    for a, b in zip(o2, o1):
        _close(a, b)
    for (h2, c2), (h1, c1) in zip(s2, s1):
        _close(h2, h1)
        _close(c2, c1)
    grads1 = {n: p.grad for n, p in theirs.named_parameters()}
    for n, p in ours.named_parameters():
        _close(p.grad, grads1[n])


def _fast_path_calls(monkeypatch):
    calls = []
    real = modules.run_layer
    monkeypatch.setattr(modules, "run_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_a_hook_based_spectral_norm_is_honoured_as_the_popular_module_does(monkeypatch):
    theirs, ours, x = _pair(1)
    for model in (theirs, ours):
        torch.manual_seed(7)  # the same random u in both
        nn.utils.spectral_norm(model.cell_list[0].conv)
    fast = _fast_path_calls(monkeypatch)
    _same_run(theirs, ours, x)
    assert len(fast) == 1  # the second layer, untouched, stays on the fast path
    assert ours.cell_list[0].conv.weight_orig.grad is not None
    _close(ours.cell_list[0].conv.weight_u, theirs.cell_list[0].conv.weight_u)


def test_pruning_trains_as_the_popular_module_for_two_steps():
    theirs, ours, x = _pair(2)
    for model in (theirs, ours):
        for cell in model.cell_list:
            prune.l1_unstructured(cell.conv, "weight", amount=0.5)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (theirs, ours)]
    for _ in range(2):
        for opt in opts:
            opt.zero_grad()
        _same_run(theirs, ours, x)
        for opt in opts:
            opt.step()
    for c1, c2 in zip(theirs.cell_list, ours.cell_list):
        assert torch.equal(c1.conv.weight_mask, c2.conv.weight_mask)
        _close(c2.conv.weight_orig, c1.conv.weight_orig)


@pytest.mark.parametrize("where", ["conv", "cell"])
def test_forward_hooks_are_called_as_often_with_the_same_arguments(where):
    theirs, ours, x = _pair(3)
    seen = {"theirs": [], "ours": []}
    for name, model in (("theirs", theirs), ("ours", ours)):
        cell = model.cell_list[1]
        target = cell.conv if where == "conv" else cell

        def pre(module, args, kwargs, name=name):
            seen[name].append(sorted(kwargs))

        def post(module, args, output, name=name):
            out = output[0] if isinstance(output, tuple) else output
            seen[name].append(out.detach().clone())
            return output * 1 if where == "conv" else output  # a hook may return a value

        target.register_forward_pre_hook(pre, with_kwargs=True)
        target.register_forward_hook(post)
    _same_run(theirs, ours, x)
    assert len(seen["ours"]) == len(seen["theirs"]) == 2 * x.shape[1]
    for a, b in zip(seen["ours"], seen["theirs"]):
        if isinstance(b, list):
            assert a == b  # cells are called by keyword, as the popular module calls them
        else:
            _close(a, b)


def test_global_hooks_see_the_same_module_calls():
    theirs, ours, x = _pair(4)
    counts = {}
    names = {}
    for tag, model in (("theirs", theirs), ("ours", ours)):
        names.update({id(m): f"{tag}:{n}" for n, m in model.named_modules()})

    def hook(module, args, output):
        key = names.get(id(module))
        if key is not None:
            counts[key] = counts.get(key, 0) + 1

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        _same_run(theirs, ours, x)
    finally:
        handle.remove()
    ours_counts = {k.split(":")[1]: v for k, v in counts.items() if k.startswith("ours")}
    theirs_counts = {k.split(":")[1]: v for k, v in counts.items() if k.startswith("theirs")}
    assert ours_counts == theirs_counts
    assert ours_counts["cell_list.0.conv"] == x.shape[1]


def test_a_cell_subclass_with_its_own_forward_is_called():
    class DampedCell(ConvLSTMCell):
        def forward(self, input_tensor, cur_state=None):
            h, c = super().forward(input_tensor, cur_state)
            return 0.5 * h, c

    torch.manual_seed(5)
    ours = ConvLSTM(2, 3, 3, 1, True, backend="torch").double()
    x = torch.randn(1, 3, 2, 4, 4, dtype=torch.float64)
    plain = ours(x)[0][0]
    ours.cell_list[0].__class__ = DampedCell
    damped = ours(x)[0][0]
    cell = ours.cell_list[0]
    h, c = cell.init_hidden(1, (4, 4))
    want = []
    for t in range(3):
        h, c = cell(x[:, t], (h, c))
        want.append(h)
    _close(damped, torch.stack(want, 1))
    assert rel_err(damped, plain) > 0.1


def test_a_replaced_convolution_is_called_with_its_own_forward():
    class Standardized(nn.Conv2d):
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    theirs, ours, x = _pair(6)
    for model in (theirs, ours):
        old = model.cell_list[0].conv
        new = Standardized(old.in_channels, old.out_channels, 3, padding=1).double()
        new.load_state_dict(old.state_dict())
        model.cell_list[0].conv = new
    _same_run(theirs, ours, x)


def test_parametrizations_stay_on_the_fast_path_and_read_the_weight_once(monkeypatch):
    theirs, ours, x = _pair(7)
    evaluations = []
    for model in (theirs, ours):
        torch.manual_seed(9)
        nn.utils.parametrizations.spectral_norm(model.cell_list[0].conv)
    ours.cell_list[0].conv.parametrizations.weight[0].register_forward_hook(
        lambda *a: evaluations.append(1))
    fast = _fast_path_calls(monkeypatch)
    with parametrize.cached():  # the popular module then computes the weight once a call
        (o1, _), (o2, _) = _run(theirs, x), _run(ours, x)
    assert len(fast) == 2 and len(evaluations) == 1
    _close(o2[0], o1[0])
    _close(o2[1], o1[1])
    original = "parametrizations.weight.original"
    g1 = dict(theirs.named_parameters())[f"cell_list.0.conv.{original}"].grad
    g2 = dict(ours.named_parameters())[f"cell_list.0.conv.{original}"].grad
    _close(g2, g1)


def test_the_plain_model_takes_the_fast_path(monkeypatch):
    _, ours, x = _pair(8)
    fast = _fast_path_calls(monkeypatch)
    ours(x)
    assert len(fast) == 2


# ---- padding modes --------------------------------------------------------------------------

MODES = ["zeros", "reflect", "replicate", "circular"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("kernel", "dilation"), [((3, 3), 1), ((2, 3), 1), ((3, 1), (1, 2))])
def test_padding_modes_match_the_oracle(backend, mode, kernel, dilation):
    torch.manual_seed(10)
    dtype = torch.float32
    m = ConvLSTM(2, HID, kernel, 2, True, return_all_layers=True, dilation=dilation,
                 backend=backend, padding_mode=mode, peephole=True)
    with torch.no_grad():
        for cell in m.cell_list:
            cell.peephole.normal_(0, 0.5)
    x = torch.randn(2, 3, 2, 5, 6, dtype=dtype, requires_grad=True)
    layers = params_from_module(m, 2, dilation)
    for p in layers:
        p.padding_mode = mode
    x64 = x.detach().double().requires_grad_(True)
    want, want_states = convlstm(x64, layers)
    got, states = m(x)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5
    assert rel_err(states[-1][1], want_states[-1][1]) <= 1e-5
    (sum(o.sum() for o in got)).backward()
    (sum(o.sum() for o in want)).backward()
    assert rel_err(x.grad, x64.grad) <= 1e-5
    for cell, p in zip(m.cell_list, layers):
        assert rel_err(cell.conv.weight.grad, p.weight.grad) <= 1e-5
        assert rel_err(cell.peephole.grad, p.peephole.grad) <= 1e-5


def test_padding_modes_equal_nn_conv2d_in_the_popular_module():
    """For odd kernels the popular module with conv.padding_mode set computes the same."""
    for mode in MODES[1:]:
        theirs, ours, x = _pair(11)
        for model in (theirs, ours):
            for cell in model.cell_list:
                cell.conv.padding_mode = mode  # set after construction: honoured too
        _same_run(theirs, ours, x)


def test_padding_mode_per_layer_and_in_the_conv():
    m = ConvLSTM(2, HID, 3, 2, padding_mode=["circular", "reflect"])
    assert [c.conv.padding_mode for c in m.cell_list] == ["circular", "reflect"]
    assert ConvLSTMCell(2, 3, 3, padding_mode="replicate").conv.padding_mode == "replicate"
    with pytest.raises(ValueError, match=r"padding_mode: expected one of .*got 'wrap'"):
        ConvLSTM(2, 3, 3, 1, padding_mode="wrap")
    with pytest.raises(ValueError, match=r"padding_mode: expected one value or a list of "
                                         r"num_layers=2 values, got a list of 3"):
        ConvLSTM(2, HID, 3, 2, padding_mode=["zeros"] * 3)


def test_circular_padding_wraps_around():
    """A feature at the right edge reaches the left edge within one step (a longitude grid)."""
    torch.manual_seed(12)
    m = ConvLSTM(1, 2, 3, 1, True, padding_mode="circular", backend="torch").double()
    x = torch.zeros(1, 1, 1, 4, 8, dtype=torch.float64)
    x[..., -1] = 1.0
    rolled = torch.roll(x, shifts=3, dims=-1)
    out, rolled_out = m(x)[0][0], m(rolled)[0][0]
    _close(torch.roll(out, shifts=3, dims=-1), rolled_out, 1e-12)  # equivariant to the shift


@pytest.mark.parametrize("mode", ["reflect", "circular"])
def test_padding_modes_with_captured_graphs(mode, graph_device):
    torch.manual_seed(13)
    dev = graph_device
    m = ConvLSTM(2, 3, (2, 3), 1, True, padding_mode=mode).to(dev)
    ref = copy.deepcopy(m)
    ref.cuda_graphs = False
    for _ in range(3):  # the second call captures, the third replays
        x = torch.randn(2, 3, 2, 5, 6, device=dev)
        torch.testing.assert_close(m(x)[0][0], ref(x)[0][0], rtol=1e-5, atol=1e-6)


def test_hooks_and_padding_mode_together():
    """The step-by-step path calls conv itself: its padding_mode and even kernels apply."""
    torch.manual_seed(14)
    m = ConvLSTM(2, 3, (2, 4), 1, True, padding_mode="circular", dilation=(1, 2),
                 backend="torch").double()
    x = torch.randn(1, 3, 2, 5, 9, dtype=torch.float64)
    fast = m(x)[0][0]
    m.cell_list[0].conv.register_forward_hook(lambda *a: None)
    _close(m(x)[0][0], fast)


# ---- meta, switches, returns ------------------------------------------------------------------

def test_meta_tensors_give_meta_outputs_of_the_right_shapes():
    with torch.device("meta"):
        m = ConvLSTM(2, [4, 5], 3, 2, True, return_all_layers=True)
        outs, states = m(torch.empty(2, 3, 2, 6, 7))
        cell = ConvLSTMCell(2, 4, (2, 3))
        h, c = cell(torch.empty(2, 2, 6, 7))
    assert [o.shape for o in outs] == [(2, 3, 4, 6, 7), (2, 3, 5, 6, 7)]
    assert all(t.is_meta for t in [*outs, *states[1], h, c])
    assert states[1][0].shape == (2, 5, 6, 7) and states[1][1].dtype == torch.float32
    assert h.shape == c.shape == (2, 4, 6, 7)
    m.to_empty(device="cpu")  # FSDP-style materialisation, then a real run
    for p in m.parameters():
        nn.init.normal_(p, std=0.1)
    assert m(torch.randn(2, 3, 2, 6, 7))[0][1].isfinite().all()


@pytest.mark.parametrize("name", ["batch_first", "bias", "return_all_layers"])
def test_drop_in_switches_take_a_bool_or_0_1(name):
    for good, want in ((True, True), (0, False), (1, True)):
        assert getattr(ConvLSTM(2, 3, 3, 1, **{name: good}), name) is want
    for bad in ("False", 2, None, 1.0):
        with pytest.raises(TypeError, match=rf"{name}: expected True or False \(or 1 or 0\)"):
            ConvLSTM(2, 3, 3, 1, **{name: bad})
    with pytest.raises(TypeError, match=r"bias: expected True or False"):
        ConvLSTMCell(2, 3, 3, bias="yes")


def test_forget_bias_must_be_finite():
    for bad in (float("inf"), float("nan"), -float("inf")):
        with pytest.raises(ValueError, match=r"forget_bias: expected a finite number"):
            ConvLSTM(2, 3, 3, 1, forget_bias=bad)


@pytest.mark.parametrize("kernel", [3.0, (3.0, 3), [3, 2.5]])
def test_a_float_kernel_size_is_named_as_such(kernel):
    with pytest.raises(TypeError, match=r"kernel_size: expected ints, got float"):
        ConvLSTM(2, 3, kernel, 1 if not isinstance(kernel, list) else 2)
    if not isinstance(kernel, list):
        with pytest.raises(TypeError, match=r"kernel_size: expected ints, got float"):
            ConvLSTMCell(2, 3, kernel)


def test_state_pairs_are_lists_as_the_popular_module_returns():
    theirs, ours, x = _pair(15)
    _, s1 = theirs(x)
    _, s2 = ours(x)
    assert [type(p) for p in s2] == [type(p) for p in s1] == [list, list]


@pytest.mark.parametrize(("mode", "size", "fits"), [("reflect", 2, False), ("reflect", 3, True),
                                                    ("circular", 2, True), ("circular", 1, False),
                                                    ("replicate", 1, True)])
def test_frames_too_small_for_the_padding_are_a_clear_error(mode, size, fits):
    """kernel 5 pads 2 a side: reflect needs sides above 2, circular at least 2."""
    m = ConvLSTM(1, 2, 5, 1, True, padding_mode=mode, backend="torch")
    cell = ConvLSTMCell(1, 2, 5, padding_mode=mode)
    x = torch.randn(1, 2, 1, size, 6)
    if fits:
        assert m(x)[0][0].shape == (1, 2, 2, size, 6)
        assert cell(x[:, 0])[0].shape == (1, 2, size, 6)
        return
    match = rf"input_tensor: padding_mode='{mode}' pads .* got H={size}, W=6"
    with pytest.raises(ValueError, match=match):
        m(x)
    with pytest.raises(ValueError, match=match):
        cell(x[:, 0])


def test_a_lone_cell_calls_its_hooked_conv():
    """ConvLSTMCell used alone: a hook on its conv runs once a step, with the same result."""
    torch.manual_seed(16)
    cell = ConvLSTMCell(2, 3, (2, 3), padding_mode="reflect").double()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    state = [torch.randn(2, 3, 5, 6, dtype=torch.float64) for _ in range(2)]
    fast = cell(x, state)
    calls = []
    cell.conv.register_forward_hook(lambda *a: calls.append(1))
    hooked = cell(x, state)
    assert len(calls) == 1
    _close(hooked[0], fast[0])
    _close(hooked[1], fast[1])


def test_the_fused_forward_leaves_other_padding_modes_to_the_split_path():
    """The fused kernel pads with zeros: with another mode the layer takes the split path."""
    torch.manual_seed(17)
    x = torch.randn(1, 3, 2, 5, 6)
    outs = []
    for fused in (False, True):
        torch.manual_seed(18)
        m = ConvLSTM(2, 3, 3, 1, True, backend="triton", padding_mode="circular",
                     fused_forward=fused)
        outs.append(m(x)[0][0])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


def test_a_forward_set_on_the_instance_is_called():
    """Wrappers (accelerate's hooks, say) replace forward on the instance, not the class."""
    for target in ("cell", "conv"):
        theirs, ours, x = _pair(19)
        calls = {"theirs": 0, "ours": 0}
        for name, model in (("theirs", theirs), ("ours", ours)):
            module = model.cell_list[0] if target == "cell" else model.cell_list[0].conv
            inner = module.forward

            def wrapped(*args, inner=inner, name=name, calls=calls, target=target, **kwargs):
                calls[name] += 1
                out = inner(*args, **kwargs)
                return (0.5 * out[0], out[1]) if target == "cell" else 0.5 * out

            module.forward = wrapped
        _same_run(theirs, ours, x)
        assert calls["ours"] == calls["theirs"] == x.shape[1]


def test_an_overridden_initial_state_is_used_as_the_popular_module_uses_it():
    class LearnedStart(ConvLSTMCell):
        def init_hidden(self, batch_size, image_size):
            h, c = super().init_hidden(batch_size, image_size)
            return h + 0.3, c - 0.2

    class LearnedModel(ConvLSTM):
        def _init_hidden(self, batch_size, image_size):
            return [[h + 0.1, c] for h, c in super()._init_hidden(batch_size, image_size)]

    torch.manual_seed(20)
    x = torch.randn(2, 3, 2, 4, 5, dtype=torch.float64)
    for kind in ("cell", "model"):
        cls = LearnedModel if kind == "model" else ConvLSTM
        m = cls(2, HID, 3, 2, True, return_all_layers=True, backend="torch").double()
        if kind == "cell":
            for cell in m.cell_list:
                cell.__class__ = LearnedStart
        outs, _ = m(x)
        given, _ = m(x, hidden_state=m._init_hidden(2, (4, 5)))
        zeros, _ = m(x, [ConvLSTMCell.init_hidden(c, 2, (4, 5)) for c in m.cell_list])
        _close(outs[1], given[1])
        assert rel_err(outs[1], zeros[1]) > 1e-3


def test_a_model_pickled_with_the_old_conv_padding_keeps_its_results():
    """Before the conv took "same" padding for even kernels and dilation it carried the popular
    (k // 2, k // 2): unpickled, it is given today's, and computes as before."""
    import pickle

    torch.manual_seed(21)
    m = ConvLSTM(2, HID, [(2, 2), 3], 2, True, dilation=[1, 2], backend="torch")
    x = torch.randn(2, 3, 2, 6, 7)
    want = m(x)[0][0]
    for cell in m.cell_list:  # what an older version built
        legacy = nn.Conv2d(cell.conv.in_channels, cell.conv.out_channels, cell.kernel_size,
                           padding=(cell.kernel_size[0] // 2, cell.kernel_size[1] // 2),
                           dilation=cell.dilation)
        legacy.load_state_dict(cell.conv.state_dict())
        cell.conv = legacy
    old = pickle.loads(pickle.dumps(m))
    assert [c.conv.padding for c in old.cell_list] == ["same", (2, 2)]
    torch.testing.assert_close(old(x)[0][0], want, rtol=0, atol=0)


def test_a_conv_replaced_by_another_module_is_called():
    torch.manual_seed(22)
    seq = nn.Sequential(nn.Conv2d(5, 5, 3, padding=1, groups=5), nn.Conv2d(5, 12, 1)).double()
    from popular_convlstm import PopularConvLSTMCell

    pop, ours = PopularConvLSTMCell(2, 3, (3, 3), True), ConvLSTMCell(2, 3, 3, backend="torch")
    pop.conv = ours.conv = seq
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    state = [torch.randn(2, 3, 5, 6, dtype=torch.float64) for _ in range(2)]
    for a, b in zip(ours(x, state), pop(x, state)):
        _close(a, b)
    h, c = ours.init_hidden(2, (5, 6))
    assert h.dtype == torch.float64 and c.shape == (2, 3, 5, 6)


def test_meta_tensors_take_the_torch_path_whatever_the_backend():
    with torch.device("meta"):
        m = ConvLSTM(2, 4, 3, 1, True, backend="triton", padding_mode="circular")
        out = m(torch.empty(2, 3, 2, 5, 6))[0][0]
        h, _ = ConvLSTMCell(2, 3, 3, backend="triton")(torch.empty(2, 2, 5, 6))
    assert out.is_meta and out.shape == (2, 3, 4, 5, 6) and h.is_meta


def test_numpy_bools_are_bools():
    import numpy as np

    m = ConvLSTM(2, 3, 3, 1, batch_first=np.True_, bias=np.False_)
    assert m.batch_first is True and m.bias is False
