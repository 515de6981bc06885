"""The CPU gate kernels (csrc/gates.c through native_gates) against the float64 oracle
(gate_oracle.py), in every layout and option the time loops and the cell hand them, and the
fallbacks to torch ops where they do not serve a call. Their build: test_native_build.py."""

import ctypes
import itertools

import pytest
import torch
from gate_oracle import F64, oracle_backward, oracle_forward

from triton_convlstm import ConvLSTM, native_build, native_gates
from triton_convlstm.reference import step_valid

# Their fp32 results against float64: the activations are polynomials within a few ulp.
TOL = 2e-6
SPATIAL = [(7,), (5, 6), (3, 4, 5), (1, 1)]


def rel_err(actual, expected):
    expected = expected.to(F64)
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.to(F64) - expected).abs().max() / scale).item()


def make(shape, channels_last, scale=1.0):
    """(B, C, *spatial) noise, channels-last (the channel the unit stride) or contiguous."""
    if not channels_last:
        return torch.randn(shape).mul_(scale)
    return torch.randn(shape[0], *shape[2:], shape[1]).mul_(scale).movedim(-1, 1)


@pytest.fixture(autouse=True)
def _built():
    assert native_build.library() is not None, native_build.load_error()


def _case(spatial, channels_last, peephole, b=3, hid=5):
    z = make((b, 4 * hid, *spatial), channels_last, scale=3.0)
    c_prev = make((b, hid, *spatial), channels_last)
    pe = torch.randn(3, hid) if peephole else None
    return z, c_prev, pe


@pytest.mark.parametrize(("spatial", "channels_last", "peephole"),
                         list(itertools.product(SPATIAL, [False, True], [False, True])))
def test_forward_matches_the_oracle(spatial, channels_last, peephole):
    z, c_prev, pe = _case(spatial, channels_last, peephole)
    h_ref, c_ref = oracle_forward(z.to(F64), c_prev.to(F64), None if pe is None else pe.to(F64))
    h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
    assert native_gates.gate_forward(z, None, c_prev, pe, h, c, None)
    assert rel_err(h, h_ref) < TOL and rel_err(c, c_ref) < TOL


@pytest.mark.parametrize(("channels_last", "peephole"),
                         list(itertools.product([False, True], [False, True])))
def test_forward_saves_the_activated_gates_in_place_and_updates_the_cell_in_place(
        channels_last, peephole):
    z, c_prev, pe = _case((4, 3), channels_last, peephole)
    z64, c64 = z.to(F64), c_prev.to(F64)
    h_ref, c_ref = oracle_forward(z64, c64, None if pe is None else pe.to(F64))
    zi, zf, zo, zg = z64.chunk(4, dim=1)
    if pe is not None:
        p = pe.to(F64).view(3, 1, -1, 1, 1)
        zi, zf, zo = zi + p[0] * c64, zf + p[1] * c64, zo + p[2] * c_ref
    gates_ref = torch.cat([torch.sigmoid(zi), torch.sigmoid(zf), torch.sigmoid(zo),
                           torch.tanh(zg)], dim=1)
    h, c = torch.empty_like(c_prev), c_prev  # the cell in place, the gates over z
    assert native_gates.gate_forward(z, z, c_prev, pe, h, c, None)
    assert rel_err(z, gates_ref) < TOL
    assert rel_err(h, h_ref) < TOL and rel_err(c, c_ref) < TOL


@pytest.mark.parametrize("peephole", [False, True])
def test_a_sample_past_its_end_keeps_its_cell_and_outputs_zero(peephole):
    z, c_prev, pe = _case((4, 3), True, peephole)
    valid = step_valid(torch.tensor([5, 2, 3]), 2, z.dim(), torch.float32)  # sample 1 ended
    gates, h, c = torch.empty_like(z), torch.empty_like(c_prev), torch.empty_like(c_prev)
    assert native_gates.gate_forward(z, gates, c_prev, pe, h, c, valid)
    assert torch.equal(c[1], c_prev[1]) and torch.equal(h[1], torch.zeros_like(h[1]))
    i, f, o, _ = gates[1].chunk(4, dim=0)
    assert (i == 0).all() and (f == 1).all() and (o == 0).all()
    h_ref, c_ref = oracle_forward(z.to(F64), c_prev.to(F64), None if pe is None else pe.to(F64))
    keep = [0, 2]
    assert rel_err(h[keep], h_ref[keep]) < TOL and rel_err(c[keep], c_ref[keep]) < TOL


def _activated(z, c_prev, pe):
    gates, h, c = torch.empty_like(z), torch.empty_like(c_prev), torch.empty_like(c_prev)
    assert native_gates.gate_forward(z, gates, c_prev, pe, h, c, None)
    return gates, c


@pytest.mark.parametrize(("spatial", "channels_last", "peephole", "grads"), [
    (sp, cl, pe, g) for sp, cl, pe in itertools.product(SPATIAL, [False, True], [False, True])
    for g in ["dh", "dh+dh2+dc"]
] + [((5, 6), True, False, g) for g in ["none", "dc", "dh2", "dh2+dc", "dh+dc"]])
def test_backward_matches_the_oracle(spatial, channels_last, peephole, grads):
    z, c_prev, pe = _case(spatial, channels_last, peephole)
    gates, c = _activated(z, c_prev, pe)
    shape = c_prev.shape
    given = {k: make(shape, channels_last) if k in grads.split("+") else None
             for k in ("dh", "dh2", "dc")}
    dz, dc_prev = torch.empty_like(z), torch.empty_like(c_prev)
    done, dpeep = native_gates.gate_backward(gates, c_prev, c, pe, given["dh"], given["dh2"],
                                             given["dc"], dz, dc_prev)
    assert done

    def total(*ts):
        ts = [t.to(F64) for t in ts if t is not None]
        return sum(ts) if ts else torch.zeros(shape, dtype=F64)

    ref = oracle_backward(z, c_prev, pe, total(given["dh"], given["dh2"]), total(given["dc"]))
    assert rel_err(dz, ref[0]) < 1e-5 and rel_err(dc_prev, ref[1]) < 1e-5
    if peephole:
        assert rel_err(dpeep, ref[2]) < 1e-5
    else:
        assert dpeep is None


def test_backward_in_place_over_the_gates_and_the_cell_gradient():
    z, c_prev, pe = _case((4, 3), True, True)
    gates, c = _activated(z, c_prev, pe)
    dh, dc = make(c.shape, True), make(c.shape, True)
    ref = oracle_backward(z, c_prev, pe, dh.to(F64), dc.to(F64))
    done, dpeep = native_gates.gate_backward(gates, c_prev, c, pe, dh, None, dc, gates, dc)
    assert done
    assert rel_err(gates, ref[0]) < 1e-5 and rel_err(dc, ref[1]) < 1e-5
    assert rel_err(dpeep, ref[2]) < 1e-5


# Row lengths (the unit-stride run: hid channels-last, the pixels channels-first) on all of
# gates.c's paths: whole vectors (16, 32) run in place; other lengths are packed into 256-float
# pieces, several short rows to a piece (3, 8, 12) or one long row over several pieces (300,
# 323); where c and h store their rows back to back, whole dense pieces first (only the gates
# copied), then the packed tail: 8 (72 rows: two pieces of 32 and a tail), 4, 12, 24, and 6
# pixels channels-first (40 channels: one piece). (hid, spatial, channels_last).
ROW_LENGTHS = [(16, (3, 2), True), (3, (4, 8), False), (8, (5, 6), True), (3, (4, 5), True),
               (12, (2, 3), True), (300, (1, 2), True), (2, (17, 19), False),
               (8, (8, 9), True), (4, (9, 10), True), (12, (6, 7), True), (24, (5, 5), True),
               (40, (2, 3), False)]


@pytest.mark.parametrize(("hid", "spatial", "channels_last"), ROW_LENGTHS)
def test_whole_and_packed_rows_match_the_oracle_forward_and_backward(hid, spatial,
                                                                     channels_last):
    z, c_prev, pe = _case(spatial, channels_last, True, b=2, hid=hid)
    valid = step_valid(torch.tensor([5, 2]), 2, z.dim(), torch.float32)  # sample 1 ended
    gates, h, c = torch.empty_like(z), torch.empty_like(c_prev), torch.empty_like(c_prev)
    assert native_gates.gate_forward(z, gates, c_prev, pe, h, c, valid)
    h_ref, c_ref = oracle_forward(z[:1].to(F64), c_prev[:1].to(F64), pe.to(F64))
    assert rel_err(h[:1], h_ref) < TOL and rel_err(c[:1], c_ref) < TOL
    assert torch.equal(c[1], c_prev[1]) and not h[1].any()
    # The backward of sample 0, in place over its gates and its cell gradient.
    gates, c = _activated(z[:1], c_prev[:1], pe)
    dh, dh2, dc = (make(c.shape, channels_last) for _ in range(3))
    ref = oracle_backward(z[:1], c_prev[:1], pe, dh.to(F64) + dh2.to(F64), dc.to(F64))
    done, dpeep = native_gates.gate_backward(gates, c_prev[:1], c, pe, dh, dh2, dc, gates, dc)
    assert done
    assert rel_err(gates, ref[0]) < 1e-5 and rel_err(dc, ref[1]) < 1e-5
    assert rel_err(dpeep, ref[2]) < 1e-5


def test_non_finite_inputs_behave_as_the_math_says():
    z = torch.zeros(1, 8, 1, 3)
    c_prev = torch.tensor([[[[0.5, 0.5, float("nan")]], [[1.0, 1.0, 1.0]]]])
    z[0, 6, 0, 0] = float("inf")  # g of channel 0 at pixel 0: tanh -> 1
    z[0, 0, 0, 1] = -float("inf")  # i of channel 0 at pixel 1: shut
    z[0, 2, 0, 1] = float("nan")  # f of channel 0 at pixel 1
    h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
    assert native_gates.gate_forward(z, None, c_prev, None, h, c, None)
    assert c[0, 0, 0, 0].item() == pytest.approx(0.5 * 0.5 + 0.5 * 1.0)
    assert c[0, 0, 0, 1].isnan() and h[0, 0, 0, 1].isnan()  # NaN never passes as a number
    assert c[0, 0, 0, 2].isnan() and h[0, 0, 0, 2].isnan()
    assert torch.isfinite(c[0, 1]).all() and torch.isfinite(h[0, 1]).all()
    one = torch.ones(1, 1, 1, 1)
    for big in (200.0, -200.0):  # saturated: no overflow to inf or NaN
        z_big = torch.full((1, 4, 1, 1), big)
        h1, c1 = torch.empty_like(one), torch.empty_like(one)
        assert native_gates.gate_forward(z_big, None, one, None, h1, c1, None)
        h_ref, c_ref = oracle_forward(z_big.to(F64), one.to(F64))
        assert rel_err(h1, h_ref) < TOL and rel_err(c1, c_ref) < TOL


def test_calls_the_kernels_do_not_serve_are_declined_unwritten():
    z, c_prev, _ = _case((4, 3), False, False)
    h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
    before = h.clone()
    assert not native_gates.gate_forward(z.double(), None, c_prev.double(), None, h.double(),
                                         c.double(), None)
    # pixels that are not one strided run: a transposed frame
    zt, ct = z.transpose(2, 3), c_prev.transpose(2, 3)
    assert not native_gates.gate_forward(zt, None, ct, None, h.transpose(2, 3),
                                         c.transpose(2, 3), None)
    # layouts that disagree (channels-last z, contiguous cell)
    z_cl = z.contiguous(memory_format=torch.channels_last)
    assert not native_gates.gate_forward(z_cl, None, c_prev, None, h, c, None)
    assert torch.equal(h.isnan(), before.isnan())  # (empties are NaN-filled in the tests)
    z.requires_grad_()
    assert native_gates.gate_forward_new(z, c_prev, None) is None  # autograd must see it
    with torch.no_grad():
        h_new, c_new = native_gates.gate_forward_new(z, c_prev, None)
    h_ref, c_ref = oracle_forward(z.detach().to(F64), c_prev.to(F64))
    assert rel_err(h_new, h_ref) < TOL and rel_err(c_new, c_ref) < TOL


@pytest.mark.parametrize("peephole", [False, True])
def test_the_layer_computes_the_same_with_and_without_the_kernels(monkeypatch, peephole):
    """The whole CPU layer, training: outputs and every gradient agree with the torch-op path
    to fp32 rounding (the kernels change the activations' last bits, nothing else)."""
    torch.manual_seed(0)
    model = ConvLSTM(3, [6, 5], (3, 3), 2, batch_first=True, peephole=peephole)
    x = torch.randn(2, 4, 3, 6, 5)

    def run():
        model.zero_grad()
        outs, states = model(x)
        (outs[-1].square().sum() + states[-1][1].sum()).backward()
        return [outs[-1], states[-1][1]] + [p.grad.clone() for p in model.parameters()]

    with_kernels = run()
    monkeypatch.setattr(native_build, "library", lambda: None)
    without = run()
    for a, b in zip(with_kernels, without):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("openmp", [True, False], ids=["openmp", "pool"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_rows_split_between_threads_give_the_same_results(monkeypatch, channels_last, openmp):
    """On torch's OpenMP workers (tcl_parallel) and on the Python pool (where the library was
    built without OpenMP, and in a forked child)."""
    if openmp and not native_build.parallel():
        pytest.skip("the library was built without OpenMP here (torch runs no libgomp)")
    if not openmp:
        monkeypatch.setattr(native_build, "parallel", lambda: False)
    z, c_prev, pe = _case((6, 5), channels_last, True, b=2, hid=7)
    dh, dc = make(c_prev.shape, channels_last), make(c_prev.shape, channels_last)

    def run():
        gates, c = _activated(z, c_prev, pe)
        dz, dcp = torch.empty_like(z), torch.empty_like(c_prev)
        _, dpeep = native_gates.gate_backward(gates, c_prev, c, pe, dh, None, dc, dz, dcp)
        return gates, c, dz, dcp, dpeep

    one = run()
    threads = torch.get_num_threads()
    monkeypatch.setattr(native_gates, "ELEMENTS_PER_THREAD", 16)
    torch.set_num_threads(3)
    try:
        assert len(native_gates._plans((z, c_prev, c_prev, c_prev))) == 3  # three threads
        split = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one[:4], split[:4]):
        assert torch.equal(a, b)
    assert torch.allclose(one[4], split[4], rtol=1e-5, atol=1e-6)  # summed in another order


def test_a_share_the_kernels_decline_is_an_error_not_a_silent_gap():
    lib = native_build.library()
    if lib is None or not native_build.parallel():
        pytest.skip("needs the library built with OpenMP")
    plan = native_build.Plan()
    plans = (ctypes.c_void_p * 2)(ctypes.addressof(plan), ctypes.addressof(plan))
    args = (ctypes.c_void_p * 2)()
    assert lib.tcl_parallel(99, 2, plans, args, 1) == 2  # an unknown entry point: both declined
    # a plan winograd.c declines (more channels than its matrices have rows): nothing written
    wino = native_build.WinogradPlan(x=native_build.Layout(channels=2), channels=1, out=1)
    with pytest.raises(RuntimeError, match="2 of 2 shares declined"):
        native_gates._run_parallel(lib.tcl_winograd3x3, [(wino, *[None] * 6)] * 2)


def _split_forward_in_child(queue):
    torch.set_num_threads(3)
    z, c_prev, _ = _case((6, 5), True, False, b=2, hid=7)
    h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
    queue.put(native_gates.gate_forward(z, None, c_prev, None, h, c, None)
              and bool(torch.isfinite(h).all()))


def test_a_forked_child_runs_the_split_rows_with_its_own_threads(monkeypatch):
    """The parent's thread pool does not survive a fork (DataLoader workers): the child must
    not wait on it."""
    import multiprocessing

    monkeypatch.setattr(native_gates, "ELEMENTS_PER_THREAD", 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        z, c_prev, _ = _case((6, 5), True, False, b=2, hid=7)
        h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
        assert native_gates.gate_forward(z, None, c_prev, None, h, c, None)  # the pool exists
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_split_forward_in_child, args=(queue,))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == 0 and queue.get(timeout=5)
    finally:
        torch.set_num_threads(threads)


def test_gradients_in_another_layout_are_read_through_a_copy():
    """The output's gradient arrives in the caller's layout (contiguous frames) while the
    loop's buffers are channels-last: still the kernel, still the oracle's numbers."""
    z, c_prev, pe = _case((4, 3), True, True)
    gates, c = _activated(z, c_prev, pe)
    dh, dc = make(c.shape, False), make(c.shape, False)  # contiguous, the rest channels-last
    dz, dcp = torch.empty_like(z), torch.empty_like(c_prev)
    done, dpeep = native_gates.gate_backward(gates, c_prev, c, pe, dh, None, dc, dz, dcp)
    assert done
    ref = oracle_backward(z, c_prev, pe, dh.to(F64), dc.to(F64))
    assert rel_err(dz, ref[0]) < 1e-5 and rel_err(dcp, ref[1]) < 1e-5
    assert rel_err(dpeep, ref[2]) < 1e-5


def test_the_one_frame_step_reads_a_state_in_another_layout():
    z, _, pe = _case((4, 3), True, True)  # a channels-last convolution's output
    c_prev = make((3, 5, 4, 3), False)  # the user's contiguous state
    with torch.no_grad():
        h, c = native_gates.gate_forward_new(z, c_prev, pe)
    h_ref, c_ref = oracle_forward(z.to(F64), c_prev.to(F64), pe.to(F64))
    assert rel_err(h, h_ref) < TOL and rel_err(c, c_ref) < TOL


def test_the_one_frame_step_reads_a_state_with_gaps():
    z, _, _ = _case((4, 3), False, False)
    c_wide = make((3, 10, 4, 3), False)
    c_prev = c_wide[:, ::2]  # every other channel: its new h and c are dense, c_prev is not
    with torch.no_grad():
        h, c = native_gates.gate_forward_new(z, c_prev, None)
    h_ref, c_ref = oracle_forward(z.to(F64), c_prev.to(F64))
    assert rel_err(h, h_ref) < TOL and rel_err(c, c_ref) < TOL


def test_peepholes_and_multipliers_of_another_dtype_or_layout_are_read_correctly():
    """Converted to contiguous fp32 for the kernel, and kept alive through the call."""
    z, c_prev, pe = _case((4, 3), True, True)
    pe64 = pe.double()  # fp64: converted
    pe_t = pe.t().contiguous().t()  # (3, hid) transposed strides: made contiguous
    valid = step_valid(torch.tensor([5, 2, 3]), 1, z.dim(), torch.float64)
    h_ref, c_ref = oracle_forward(z.to(F64), c_prev.to(F64), pe.to(F64))
    for p in (pe64, pe_t):
        h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
        assert native_gates.gate_forward(z, None, c_prev, p, h, c, valid)
        assert rel_err(h, h_ref) < TOL and rel_err(c, c_ref) < TOL
        with torch.no_grad():
            h, c = native_gates.gate_forward_new(z, c_prev, p)
        assert rel_err(h, h_ref) < TOL and rel_err(c, c_ref) < TOL


# ---- what must see torch ops, what the kernels must refuse ------------------------------------


def _cell_and_inputs():
    from triton_convlstm import ConvLSTMCell

    torch.manual_seed(0)
    cell = ConvLSTMCell(2, 3, (3, 3), True)
    x, h, c = torch.randn(4, 2, 5, 6), torch.randn(4, 3, 5, 6), torch.randn(4, 3, 5, 6)
    return cell, x, h, c


def _without_kernels(monkeypatch, fn):
    with monkeypatch.context() as mp:
        mp.setattr(native_build, "library", lambda: None)
        return fn()


def test_vmap_jvp_and_forward_ad_see_torch_ops(monkeypatch):
    """functorch's wrapped tensors and dual tensors carry more than memory: a ctypes call on
    them crashed (vmap, jvp) or dropped the tangent (forward AD)."""
    import torch.autograd.forward_ad as fwAD

    cell, x, h, c = _cell_and_inputs()
    with torch.no_grad():
        def vmapped():
            return torch.vmap(lambda a, b, d: cell(a[None], (b[None], d[None])))(x, h, c)
        got, want = vmapped(), _without_kernels(monkeypatch, vmapped)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)
    tangent = torch.randn_like(x)

    def jvp():
        return torch.func.jvp(lambda a: cell(a, (h, c))[0], (x,), (tangent,))[1]

    assert torch.allclose(jvp(), _without_kernels(monkeypatch, jvp), atol=1e-6)

    def dual():
        with fwAD.dual_level():
            out = cell(fwAD.make_dual(x, tangent), (h, c))[0]
            return fwAD.unpack_dual(out).tangent

    got = dual()
    assert got is not None and torch.allclose(got, _without_kernels(monkeypatch, dual), atol=1e-6)


def test_make_fx_records_the_gate_math():
    from torch.fx.experimental.proxy_tensor import make_fx

    z, c_prev, _ = _case((4, 3), False, False)

    def step(z, c):
        with torch.no_grad():
            out = native_gates.gate_forward_new(z, c, None)
        return out if out is not None else torch.zeros(0)

    graph = make_fx(step, tracing_mode="real")(z, c_prev)
    assert "empty_like" not in str(graph.code)  # declined: nothing half-recorded
    from triton_convlstm.apps.bench.memory import TensorMemoryTracker

    with TensorMemoryTracker():  # a mode that only counts tensors lets the kernels run
        assert native_gates.gate_forward_new(z, c_prev, None) is not None


def test_inputs_the_kernels_would_misread_are_refused():
    z, c_prev, pe = _case((4, 3), False, True)  # B3 hid5
    h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
    one = torch.ones(1, 1, 1, 1)
    assert not native_gates.gate_forward(z, None, c_prev, None, h, c, one)  # valid of B1
    assert not native_gates.gate_forward(z, None, c_prev, pe[:, :1], h, c, None)  # (3, 1)
    assert not native_gates.gate_forward(z, None, c_prev[:1], None, h, c, None)  # batch 1
    wide = torch.empty(3, 5, 4, 1).expand(3, 5, 4, 3)  # a written tensor overlapping itself
    assert not native_gates.gate_forward(z, None, c_prev, None, h, wide, None)
    gates, cc = _activated(z, c_prev, pe)
    dz, dcp = torch.empty_like(z), torch.empty_like(c_prev)
    assert not native_gates.gate_backward(gates, c_prev, cc, pe[:, :2], h, None, None, dz,
                                          dcp)[0]


def test_a_shut_forget_gate_times_an_infinite_cell_is_nan_as_in_torch():
    z = torch.zeros(1, 4, 1, 1)
    z[0, 1] = -float("inf")
    c_prev = torch.full((1, 1, 1, 1), float("inf"))
    h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
    assert native_gates.gate_forward(z, None, c_prev, None, h, c, None)
    _, c_ref = oracle_forward(z.to(F64), c_prev.to(F64))
    assert c_ref.isnan().all() and c.isnan().all()


def test_a_training_backward_runs_every_step_in_the_kernels(monkeypatch):
    """The output's gradient arrives contiguous, the loop's buffers are channels-last: the loop
    copies each step's into its scratch, so the kernels never decline nor copy it again."""
    done, copied = [], []
    real_backward, real_like = native_gates.gate_backward, native_gates._like

    def backward(*args):
        out = real_backward(*args)
        done.append(out[0])
        return out

    def like(t, layout):
        copied.append(t is not None)
        return real_like(t, layout)

    monkeypatch.setattr(native_gates, "gate_backward", backward)
    monkeypatch.setattr(native_gates, "_like", like)
    model = ConvLSTM(3, 6, (3, 3), 1, batch_first=True)
    out, _ = model(torch.randn(2, 4, 3, 6, 5))
    out[0].square().sum().backward()
    assert done == [True] * 4 and not any(copied)
