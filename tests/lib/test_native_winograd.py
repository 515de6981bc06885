"""native_winograd: 3x3 convolutions by F(2x2, 3x3) (csrc/winograd.c) inside native_step's
step and for the backward's input and weight gradients, against the float64 reference: frame sizes
odd and even (tiles past the edge), blocks of tiles whole and partial, inputs channels-first
and channels-last, the zero state; the weight transform's cache; the calls it declines; the
layers that use it; and threads sharing the tiles."""

import pytest
import torch

from triton_convlstm import (
    ConvLSTM,
    ConvLSTMCell,
    native_build,
    native_frame,
    native_step,
    native_winograd,
)
from triton_convlstm.conv import conv_same, conv_same_input_grad, conv_same_weight_grad
from triton_convlstm.reference import gate_forward_ref

pytestmark = pytest.mark.skipif(native_build.library() is None or not native_build.has_sgemm(),
                                reason="no C compiler or no sgemm here: the torch ops run")


@pytest.fixture(autouse=True)
def threads():
    """One thread unless a test sets more (on several, small convolutions go to torch's);
    torch's count restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _last(t):
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def _rel(got, want):
    assert not got.isnan().any()
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _case(b, cx, hid, spatial, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cx, *spatial, generator=g)
    h = _last(torch.randn(b, hid, *spatial, generator=g))
    c = _last(torch.randn(b, hid, *spatial, generator=g))
    w = torch.randn(4 * hid, cx + hid, 3, 3, generator=g) / (9 * (cx + hid)) ** 0.5
    return x, h, c, w, torch.randn(4 * hid, generator=g), torch.randn(3, hid, generator=g)


@pytest.mark.parametrize(("b", "cx", "hid", "spatial"), [
    (2, 3, 8, (5, 6)),     # an odd height: the last tile row half outside
    (3, 4, 16, (17, 17)),  # 243 tiles: seven whole blocks of 32 and a partial one
    (1, 1, 8, (1, 1)),     # one pixel: one tile, three of its outputs outside
    (2, 16, 8, (4, 9)),
])
@pytest.mark.parametrize("x_last", [False, True])  # a batch-first input's frames are NCHW
def test_the_step_matches_the_float64_reference(monkeypatch, b, cx, hid, spatial, x_last):
    made = []
    transform = native_winograd.transform_weight
    monkeypatch.setattr(native_winograd, "transform_weight",
                        lambda *a, **k: made.append(a[0]) or transform(*a, **k))
    x, h, c, w, bias, p = _case(b, cx, hid, spatial)
    x = _last(x) if x_last else x.contiguous()
    h_out, c_out = torch.empty_like(c), torch.empty_like(c)
    gates = _last(torch.empty(b, 4 * hid, *spatial))
    assert native_step.step_into(x, h, c, w, bias, p, (1, 1), h_out=h_out, c_out=c_out,
                                 gates=gates, pixel_major=True)
    assert made and made[0] is w  # (served by winograd.c, not the columns)
    z = conv_same(torch.cat([x, h], 1).double(), w.double(), (1, 1), bias.double())
    want_h, want_c = gate_forward_ref(z, c.double(), p.double())
    assert _rel(h_out, want_h) < 1e-5 and _rel(c_out, want_c) < 1e-5
    want_i = torch.sigmoid(z[:, :hid] + p.double()[0].view(1, hid, 1, 1) * c.double())
    assert _rel(gates[:, :hid], want_i) < 1e-5  # the saved input gate


@pytest.mark.parametrize("given_state", [False, True])
def test_the_loop_of_calls_with_the_zero_state_reads_x_channels_of_the_whole_transform(
        given_state):
    # Without h0 the first step convolves x alone (fewer channels than MIN_CHANNELS here)
    # with the rows of the layer's one transform; the others [x, h].
    torch.manual_seed(1)
    model = ConvLSTM(2, 8, 3, 1, batch_first=True, peephole=True)
    x = torch.randn(2, 3, 2, 7, 6)
    state = [tuple(torch.randn(2, 8, 7, 6) for _ in range(2))] if given_state else None
    want = model.double()(x.double(), None if state is None else [
        tuple(s.double() for s in state[0])])
    model.float()
    with torch.no_grad():
        got = model(x, state)
    assert _rel(got[0][0], want[0][0]) < 1e-5 and _rel(got[1][0][1], want[1][0][1]) < 1e-5


@pytest.mark.parametrize(("n", "o", "c", "spatial"), [(2, 32, 16, (5, 6)), (3, 64, 16, (17, 9)),
                                                      (1, 16, 24, (1, 1))])
def test_the_input_gradient_matches_the_float64_reference(n, o, c, spatial):
    g = torch.Generator().manual_seed(2)
    grad = _last(torch.randn(n, o, *spatial, generator=g))
    w = torch.randn(o, c, 3, 3, generator=g)
    dx = native_winograd.input_grad(grad, (n, c, *spatial), w, (1, 1), True)
    assert dx is not None and dx.shape == (n, c, *spatial) and dx.stride(1) == 1
    want = conv_same_input_grad(grad.double(), (n, c, *spatial), w.double(), (1, 1))
    assert _rel(dx, want) < 1e-5


def test_the_calls_it_does_not_serve_are_declined():
    grad, w = _last(torch.randn(2, 32, 6, 6)), torch.randn(32, 16, 3, 3)
    shape = (2, 16, 6, 6)
    ok = native_winograd.input_grad(grad, shape, w, (1, 1), True)
    assert ok is not None
    for args in [
        (grad, shape, w, (1, 1), False),                        # channels-first frames
        (grad, shape, w, (2, 2), True),                         # dilated
        (grad, shape, torch.randn(32, 16, 5, 5), (1, 1), True),  # another kernel
        (grad, (2, 8, 6, 6), torch.randn(32, 8, 3, 3), (1, 1), True),  # too few channels
        (grad.contiguous(), shape, w, (1, 1), True),           # grad's channels apart
        (grad.double(), shape, w.double(), (1, 1), True),       # not fp32
        (grad[..., :3], (2, 16, 6, 3), w, (1, 1), True),        # (a slice: shape mismatch)
    ]:
        assert native_winograd.input_grad(*args) is None
    assert not native_winograd.fits((6,), (3,), (1,), 64)  # 1-d
    assert not native_winograd.fits((6, 6), (3, 3), (1, 1), native_winograd.MIN_CHANNELS - 1)
    with torch.enable_grad():  # autograd must see a weight that needs it
        assert native_winograd.input_grad(grad, shape, w.requires_grad_(), (1, 1), True) is None


def test_the_transform_is_kept_until_the_weight_changes():
    w = torch.randn(8, 4, 3, 3)
    u = native_winograd.transform_weight(w)
    assert native_winograd.transform_weight(w) is u
    ut = native_winograd.transform_weight(w, transposed=True)
    assert ut is not u and ut.shape == (16, 8, 4) and u.shape == (16, 4, 8)
    w.mul_(2)  # an optimizer step: the version counter moves
    u2 = native_winograd.transform_weight(w)
    assert u2 is not u and torch.allclose(u2, 2 * u)
    # U[k] for k = 4a + b is G w G^T: the centre tap alone gives the outer product of G's
    # middle column with itself
    one = torch.zeros(1, 1, 3, 3)
    one[0, 0, 1, 1] = 1
    mid = torch.tensor([0.0, 0.5, -0.5, 0.0])
    assert torch.equal(native_winograd.transform_weight(one).view(4, 4), torch.outer(mid, mid))


@pytest.mark.parametrize("transposed", [False, True])
def test_the_transform_of_a_strided_weight_matches_the_float64_one(transposed):
    full = torch.randn(12, 9, 3, 3)
    w = full[:, 4:]  # the recurrent slice the backward hands over: rows apart
    g = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
                     dtype=torch.float64)
    ref = w.double().transpose(0, 1).flip(2, 3) if transposed else w.double()
    want = torch.einsum("ai,ocij,bj->abco", g, ref, g).reshape(16, ref.shape[1], ref.shape[0])
    got = native_winograd.transform_weight(w, transposed=transposed)
    assert got.dtype == torch.float32 and _rel(got, want) < 1e-7


def test_a_layer_trains_and_infers_through_it_as_the_float64_layer(monkeypatch):
    # 16 + 32 channels: the forward steps, both input gradients (128 -> 16 and 32) and both
    # weight gradients (128 x 16 and 128 x 32) by winograd.c; against the layer in float64.
    calls = {"step": 0, "input": 0, "weight": 0}
    transform = native_winograd.transform_weight

    def counted_transform(*a, **k):
        calls["step"] += not k.get("transposed", False)
        return transform(*a, **k)

    def counting(name, fn):
        def run(*a, **k):
            out = fn(*a, **k)
            calls[name] += out is not None
            return out
        return run

    monkeypatch.setattr(native_winograd, "transform_weight", counted_transform)
    monkeypatch.setattr(native_winograd, "input_grad",
                        counting("input", native_winograd.input_grad))
    monkeypatch.setattr(native_winograd, "weight_grad",
                        counting("weight", native_winograd.weight_grad))
    torch.manual_seed(3)
    model = ConvLSTM(16, 32, 3, 2, batch_first=True, peephole=True)
    x = torch.randn(2, 4, 16, 7, 8, requires_grad=True)
    out, last = model(x)
    (out[0].square().sum() + last[0][1].sum()).backward()
    assert calls["step"] and calls["input"] >= 4 and calls["weight"] >= 4, calls
    ref = ConvLSTM(16, 32, 3, 2, batch_first=True, peephole=True).double()
    ref.load_state_dict(model.state_dict())
    x64 = x.detach().double().requires_grad_()
    out64, last64 = ref(x64)
    (out64[0].square().sum() + last64[0][1].sum()).backward()
    assert _rel(out[0], out64[0]) < 1e-5
    assert _rel(x.grad, x64.grad) < 1e-5
    for p, q in zip(model.parameters(), ref.parameters()):
        assert _rel(p.grad, q.grad) < 1e-5


@pytest.mark.parametrize(("n", "o", "c", "spatial", "x_last"), [
    (2, 64, 32, (5, 6), True),      # an odd frame: tiles past the edge
    (3, 128, 16, (17, 9), False),   # channels-first input (packed per tile), several blocks
    (1, 128, 24, (1, 1), True),
])
def test_the_weight_gradient_matches_the_float64_reference(n, o, c, spatial, x_last):
    g = torch.Generator().manual_seed(6)
    grad = _last(torch.randn(n, o, *spatial, generator=g))
    x = torch.randn(n, c, *spatial, generator=g)
    x = _last(x) if x_last else x
    w = torch.empty(o, c, 3, 3)
    dw = native_winograd.weight_grad(grad, x, w, (1, 1), True)
    assert dw is not None and dw.shape == w.shape and dw.is_contiguous()
    want = conv_same_weight_grad(grad.double(), x.double(), w.double(), (1, 1))
    assert _rel(dw, want) < 1e-5


def test_the_weight_gradients_it_does_not_serve_are_declined(threads):
    grad, x, w = _last(torch.randn(2, 128, 6, 6)), _last(torch.randn(2, 16, 6, 6)), torch.empty(
        128, 16, 3, 3)
    assert native_winograd.weight_grad(grad, x, w, (1, 1), True) is not None
    for args in [
        (grad, x, w, (1, 1), False),                             # channels-first frames
        (grad, x, w, (2, 2), True),                              # dilated
        (grad[:, :32], x, torch.empty(32, 16, 3, 3), (1, 1), True),  # too few pairs
        (grad, x[:, :8], torch.empty(128, 8, 3, 3), (1, 1), True),    # too few channels
        (grad.contiguous(), x, w, (1, 1), True),                 # grad's channels apart
        (grad.double(), x.double(), w, (1, 1), True),            # not fp32
    ]:
        assert native_winograd.weight_grad(*args) is None
    threads(2)  # too few multiply-adds to share: torch's, on all threads
    assert native_winograd.weight_grad(grad, x, w, (1, 1), True) is None


def test_threads_share_the_tiles_and_give_the_reference_result(monkeypatch, threads):
    # Three threads, each a share of whole blocks (the share thresholds lowered to these
    # small frames): the time loop's steps, the masked steps' (lengths), the input gradients
    # and the weight gradients (a sum per thread), against the float64 layer.
    threads(3)
    monkeypatch.setattr(native_winograd, "THREAD_MACS", 1)
    monkeypatch.setattr(native_winograd, "WEIGHT_GRAD_THREAD_MACS", 1)
    monkeypatch.setattr(native_winograd, "THREAD_BLOCKS", 1)
    monkeypatch.setattr(native_step, "_PLANS", {})
    monkeypatch.setattr(native_winograd, "_PLANS", {})
    shared, summed = [], []
    step, weight_grad = native_step._shared_step, native_winograd.weight_grad
    monkeypatch.setattr(native_step, "_shared_step",
                        lambda lib, parts, *a: shared.append(len(parts[0])) or step(lib, parts,
                                                                                     *a))
    monkeypatch.setattr(native_winograd, "weight_grad",
                        lambda *a: summed.append(weight_grad(*a)) or summed[-1])
    torch.manual_seed(4)
    model = ConvLSTM(4, 32, 3, 1, batch_first=True, peephole=True)
    ref = ConvLSTM(4, 32, 3, 1, batch_first=True, peephole=True).double()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 4, 13, 13, requires_grad=True)  # 2 x 7 x 7 tiles, blocks of 32
    lengths = torch.tensor([3, 2])
    for kw in ({}, {"lengths": lengths}):
        shared.clear()
        summed.clear()
        out, last = model(x, **kw)
        (out[0].square().sum() + last[0][1].sum()).backward()
        assert shared and max(shared) == 3  # (the zero state's first step may run whole)
        assert any(dw is not None for dw in summed)
        x64 = x.detach().double().requires_grad_()
        out64, last64 = ref(x64, **kw)
        (out64[0].square().sum() + last64[0][1].sum()).backward()
        assert _rel(out[0], out64[0]) < 1e-5 and _rel(last[0][1], last64[0][1]) < 1e-5
        assert _rel(x.grad, x64.grad) < 1e-5
        for p, q in zip(model.parameters(), ref.parameters()):
            assert _rel(p.grad, q.grad) < 1e-5
        x.grad = None
        model.zero_grad()
        ref.zero_grad()


def test_on_several_threads_small_convolutions_go_to_torch(threads):
    # Too few multiply-adds to keep half the threads busy: torch's convolution, on all of
    # them, serves (the step declines winograd.c; the input gradient declines).
    threads(2)
    x, h, c, w, bias, p = _case(2, 3, 8, (6, 6))
    plan = native_winograd.make_plan(2, (6, 6), native_build.Layout(3, 108, 36, 1),
                                     native_build.Layout(8, 288, 1, 8), 32, 11, 36 * 32, 32)
    lib = native_build.library()
    assert native_winograd.split_plan(lib, plan, 2) is None
    assert native_winograd.split_plan(lib, plan, 1)[0][0] is plan
    grad = _last(torch.randn(2, 32, 6, 6))
    assert native_winograd.input_grad(grad, (2, 16, 6, 6), torch.randn(32, 16, 3, 3), (1, 1),
                                      True) is None


def test_one_frame_at_a_time_through_channels_last_copies_of_the_state(monkeypatch):
    # The cell's one-frame call (its state channels-first, as users hold it) convolves by
    # winograd.c on channels-last copies of h and c (the threshold lowered to this frame):
    # the same state as the float64 cell, returned contiguous, the caller's c untouched.
    monkeypatch.setattr(native_frame, "WINOGRAD_FORWARD_MACS", 1)
    monkeypatch.setattr(native_frame, "_PLANS", {})  # (decisions are memoised with the plans)
    served = []
    into = native_step.step_into
    monkeypatch.setattr(native_step, "step_into",
                        lambda *a, **k: served.append(k["pixel_major"]) or into(*a, **k))
    torch.manual_seed(5)
    cell = ConvLSTMCell(2, 16, 3, True)
    ref = ConvLSTMCell(2, 16, 3, True).double()
    ref.load_state_dict(cell.state_dict())
    state, state64 = None, None
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 2, 7, 10)
            held = None if state is None else (state[1], state[1].clone())
            state = cell(x, state)
            state64 = ref(x.double(), state64)
            if held is not None:
                assert torch.equal(*held)  # the caller's c, not updated in place
            assert all(s.is_contiguous() for s in state)
            assert _rel(state[0], state64[0]) < 1e-5 and _rel(state[1], state64[1]) < 1e-5
    assert served and all(served)


@pytest.mark.parametrize("seed", range(8))
def test_random_layers_through_it_match_the_float64_layer(seed):
    # What a user might build, drawn at random with >= 8 channels a step (so that winograd.c
    # serves): frame sizes odd and even, 1-3 layers of mixed widths, either batch order,
    # bidirectional, peepholes, lengths, a given state or none, recompute_gates; the
    # outputs, the last states and every gradient against the same model in float64.
    g = torch.Generator().manual_seed(100 + seed)

    def pick(*options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    b, t = pick(1, 2, 3), pick(1, 2, 4)
    h_, w_ = pick(1, 3, 6, 9), pick(2, 5, 8)
    cin = pick(1, 3, 8, 17)
    layers = pick(1, 2, 3)
    hidden = [pick(8, 12, 16, 24) for _ in range(layers)]
    kw = dict(batch_first=pick(False, True), bidirectional=pick(False, True),
              peephole=pick(False, True), recompute_gates=pick(False, True),
              return_all_layers=True)
    torch.manual_seed(seed)
    model = ConvLSTM(cin, hidden, 3, layers, **kw)
    ref = ConvLSTM(cin, hidden, 3, layers, **kw).double()
    ref.load_state_dict(model.state_dict())
    shape = (b, t, cin, h_, w_) if kw["batch_first"] else (t, b, cin, h_, w_)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    extra = {}
    if b > 1 and pick(False, True):
        extra["lengths"] = torch.tensor([t] + [max(1, t - 1)] * (b - 1))
    directions = 2 if kw["bidirectional"] else 1
    state = None
    if pick(False, True) and directions == 1:
        state = [tuple(torch.randn(b, hid, h_, w_, generator=g) for _ in range(2))
                 for hid in hidden]
    out, last = model(x, state, **extra)
    loss = sum(o.square().sum() for o in out) + sum(s[1].sum() for s in last)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    state64 = None if state is None else [tuple(s.double() for s in p) for p in state]
    out64, last64 = ref(x64, state64, **extra)
    (sum(o.square().sum() for o in out64) + sum(s[1].sum() for s in last64)).backward()
    for got, want in zip(out, out64):
        assert _rel(got, want) < 1e-5
    for got, want in zip(last, last64):
        assert _rel(got[0], want[0]) < 1e-5 and _rel(got[1], want[1]) < 1e-5
    assert _rel(x.grad, x64.grad) < 1e-5
    for p, q in zip(model.parameters(), ref.parameters()):
        assert _rel(p.grad, q.grad) < 1e-5
