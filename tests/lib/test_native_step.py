"""native_step: a whole inference step (columns, torch's BLAS sgemm, bias, gate update) in one
C call, against the float64 reference (conv_same, then reference.gate_forward_ref); the calls
it declines; the cell and the layer's one-frame call, which use it; and threads."""

import itertools
import math
import platform
import threading

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from triton_convlstm import (
    ConvLSTM,
    ConvLSTM3d,
    ConvLSTMCell,
    ConvLSTMCell3d,
    native_build,
    native_frame,
    native_gates,
    native_step,
)
from triton_convlstm.conv import conv_same
from triton_convlstm.reference import gate_forward_ref

pytestmark = pytest.mark.skipif(native_build.library() is None,
                                reason="no C compiler here: the torch ops run")


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="the sgemm is looked up where torch's x86 Linux wheel has it")
def test_the_x86_torch_wheel_hands_over_its_sgemm():
    # CI runs torch's x86 wheel (MKL): a lost sgemm would quietly lose the fused step.
    assert native_build.has_sgemm()


def _case(b, cx, hid, spatial, k, peephole, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cx, *spatial, generator=g)
    h = torch.randn(b, hid, *spatial, generator=g)
    c = torch.randn(b, hid, *spatial, generator=g)
    w = torch.randn(4 * hid, cx + hid, *(k,) * len(spatial), generator=g) * 0.3
    bias = torch.randn(4 * hid, generator=g)
    p = torch.randn(3, hid, generator=g) if peephole else None
    return x, h, c, w, bias, p


def _want(x, h, c, w, bias, p, dilation):
    frame = x if h is None else torch.cat([x, h], 1)
    z = conv_same(frame.double(), w.double(), dilation,
                  None if bias is None else bias.double())
    return gate_forward_ref(z, c.double(), None if p is None else p.double())


def _close(got, want):
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.is_contiguous() and not g.isnan().any()
        assert ((g.double() - w).abs().max() / w.abs().max()).item() < 1e-5


@pytest.mark.parametrize(("spatial", "k", "d", "peephole", "bias", "b"), [
    *itertools.product([(13,), (6, 7), (3, 4, 5)], [2, 3], [1, 2], [False, True], [True],
                       [2]),
    ((6, 7), 3, 1, False, False, 1),
])
def test_the_step_matches_the_float64_reference(spatial, k, d, peephole, bias, b):
    x, h, c, w, bias_t, p = _case(b, 2, 4, spatial, k, peephole)
    bias_t = bias_t if bias else None
    dilation = (d,) * len(spatial)
    _close(native_frame.step_forward(x, h, c, w, bias_t, p, dilation),
           _want(x, h, c, w, bias_t, p, dilation))
    # The zero state: the weight's x channels alone (a slice, rows with gaps between them).
    _close(native_frame.step_forward(x, None, c, w[:, :2], bias_t, p, dilation),
           _want(x, None, c, w[:, :2], bias_t, p, dilation))


def test_inputs_in_other_layouts_are_read_where_they_are():
    x, h, c, w, bias, p = _case(2, 3, 4, (5, 6), 3, True)
    video = torch.randn(2, 4, 3, 5, 6)
    x = video[:, 1]  # a frame of a batch-first video: a gap per sample
    h = h.contiguous(memory_format=torch.channels_last)
    _close(native_frame.step_forward(x, h, c, w, bias, p, (1, 1)),
           _want(x, h, c, w, bias, p, (1, 1)))


def _declined(**change):
    x, h, c, w, bias, p = _case(1, 2, 4, (5, 6), 3, True)
    args = dict(x=x, h=h, c=c, weight=w, bias=bias, peephole=p, dilation=(1, 1))
    args.update(change)
    return native_frame.step_forward(**args) is None


def test_calls_it_does_not_serve_are_declined(monkeypatch):
    x, h, c, w, bias, p = _case(1, 2, 4, (5, 6), 3, True)
    assert not _declined()
    assert _declined(x=x.double())
    assert _declined(c=c.contiguous(memory_format=torch.channels_last))  # the gate plan's rows
    assert _declined(weight=w.contiguous(memory_format=torch.channels_last))
    assert _declined(weight=w[:, :5])  # channels disagree
    assert _declined(h=torch.randn(1, 4, 5, 5))
    assert _declined(peephole=torch.randn(3, 5))
    assert _declined(bias=torch.randn(8, 2)[:, 0])  # a strided bias
    # Rows of the weight closer than a row apart overlap (sgemm would refuse them).
    assert _declined(weight=w[:1].expand_as(w))
    assert _declined(weight=w.as_strided(w.shape, (w[0].numel() - 1, *w.stride()[1:])))
    assert _declined(dilation=(0, 1)) and _declined(dilation=(-1, 1))
    assert _declined(dilation=(300, 300))  # a padded copy far larger than the work
    big = torch.randn(1, 2, 64, 65)
    assert _declined(x=big, h=torch.randn(1, 4, 64, 65), c=torch.randn(1, 4, 64, 65))
    assert _declined(weight=w.clone().requires_grad_())  # autograd must see it
    with torch.no_grad():
        assert not _declined(weight=w.clone().requires_grad_())
    with FakeTensorMode() as mode:
        assert _declined(x=mode.from_tensor(x))
    monkeypatch.setattr(native_build.library(), "has_sgemm", False)
    assert _declined()


def test_the_cell_and_the_layers_one_frame_call_run_it_with_the_same_results(monkeypatch):
    torch.manual_seed(3)
    cell = ConvLSTMCell(2, 4, 3, peephole=True).eval()
    layer = ConvLSTM(2, 4, 3, 2, batch_first=True, return_all_layers=True).eval()
    x = torch.randn(2, 1, 2, 6, 6)
    state = (torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6))
    served = []
    fused = native_frame.step_forward
    monkeypatch.setattr(native_frame, "step_forward",
                        lambda *a: served.append(1) or fused(*a))
    with torch.no_grad():
        runs = [(cell(x[:, 0], state), layer(x, [state, state]))]
        assert len(served) == 3  # the cell, then both layers
        monkeypatch.setattr(native_build.library(), "has_sgemm", False)
        runs.append((cell(x[:, 0], state), layer(x, [state, state])))
    (cell_a, (out_a, last_a)), (cell_b, (out_b, last_b)) = runs
    for a, b in zip([*cell_a, *out_a, *sum(last_a, [])], [*cell_b, *out_b, *sum(last_b, [])]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_threads_running_steps_of_different_sizes_at_once():
    cell = ConvLSTMCell3d(1, 3, 3).eval()
    sizes = [(2, 3, 4), (4, 5, 6), (3, 4, 5), (8, 8, 8)]
    frames = [torch.randn(b, 1, *s) for b, s in zip([2, 2, 3, 40], sizes)]
    states = [(torch.randn(f.shape[0], 3, *f.shape[2:]),) * 2 for f in frames]
    with torch.no_grad():
        want = [cell(f, s) for f, s in zip(frames, states)]
    got = [None] * 4

    def run(k):
        with torch.no_grad():
            for j in range(20):
                n = (k + j) % 4
                out = cell(frames[n], states[n])
                if n == k:
                    got[k] = out

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (h, c), (hw, cw) in zip(got, want):
        assert torch.equal(h, hw) and torch.equal(c, cw)


@pytest.mark.parametrize("spatial", [(9,), (4, 5), (3, 4, 5), (1,), (1, 1, 1)])
@pytest.mark.parametrize("pixel_major", [False, True])
def test_into_given_buffers_in_place_with_saved_gates_and_a_mask(spatial, pixel_major):
    # (one pixel: the buffers' strides of size-1 dims differ from z's, and do not matter)
    # The time loops' form: h into its slot, c updated in place, the activated gates saved
    # (laid out as z), a sample past its end masked (it keeps its cell, its h is zero).
    x, h, c, w, bias, p = _case(2, 2, 4, spatial, 3, True, seed=4)

    def laid(t):
        return t.movedim(1, -1).contiguous().movedim(-1, 1) if pixel_major else t.contiguous()

    x, h, c = laid(x), laid(h), laid(c)
    c_in = c.clone()
    h_out, gates = laid(torch.empty_like(h)), laid(torch.empty(2, 16, *spatial))
    valid = torch.tensor([1.0, 0.0]).view(2, *(1,) * (len(spatial) + 1))
    assert native_step.step_into(x, h, c, w, bias, p, (1,) * len(spatial), h_out=h_out, c_out=c,
                                 gates=gates, valid=valid, pixel_major=pixel_major)
    want_h, want_c = _want(x[:1], h[:1], c_in[:1], w, bias, p, (1,) * len(spatial))
    _close((h_out[:1].contiguous(), c[:1].contiguous()), (want_h, want_c))
    assert torch.equal(c[1], c_in[1]) and not h_out[1].any()  # the masked sample
    z = conv_same(torch.cat([x, h], 1)[:1].double(), w.double(), (1,) * len(spatial),
                  bias.double())
    i, f, o, g = z.chunk(4, 1)
    pd = p.double().view(3, 4, *(1,) * len(spatial))
    want_i = torch.sigmoid(i + pd[0] * c_in[:1].double())
    assert ((gates[:1, :4].double() - want_i).abs().max() < 1e-5)
    assert torch.equal(gates[1, :4], torch.zeros_like(gates[1, :4]))  # i shut past the end


@pytest.mark.parametrize(("cls", "spatial"), [(ConvLSTM, (6, 6)), (ConvLSTM3d, (3, 4, 4))])
def test_the_loops_run_it_with_the_same_results(monkeypatch, cls, spatial):
    # Inference and training, lengths included, against the same layer without the sgemm.
    torch.manual_seed(5)
    model = cls(2, 4, 3, 2, batch_first=True)
    x = torch.randn(3, 4, 2, *spatial, requires_grad=True)
    lengths = torch.tensor([4, 2, 3])
    served = []
    into = native_step.step_into
    monkeypatch.setattr(native_step, "step_into", lambda *a, **k: served.append(into(*a, **k))
                        or served[-1])

    def run():
        with torch.no_grad():
            inferred = model(x, lengths=lengths)[0][0]
        out, state = model(x, lengths=lengths)
        (out[0].square().sum() + state[0][1].sum()).backward()
        grads = [x.grad.clone(), *(p.grad.clone() for p in model.parameters())]
        x.grad = None
        model.zero_grad()
        return [inferred, out[0].detach(), *grads]

    fused = run()
    assert served and all(served)
    monkeypatch.setattr(native_build.library(), "has_sgemm", False)
    for got, want in zip(fused, run()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pixel_major", [False, True])
@pytest.mark.parametrize("tile", [1, 162 * 5 * 5])  # rows 162, W 5: 1, then 5 rows a tile
def test_columns_built_a_tile_of_rows_at_a_time_give_the_same_step(monkeypatch, pixel_major,
                                                                   tile):
    # One output row per tile, then 5 of the 12 (a partial last tile): the products add onto
    # the bias tile by tile.
    monkeypatch.setattr(native_step, "TILE_FLOATS", tile)
    monkeypatch.setattr(native_step, "_PLANS", {})
    x, h, c, w, bias, p = _case(2, 2, 4, (3, 4, 5), 3, True, seed=7)
    if pixel_major:
        x, h, c = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (x, h, c))
    want = _want(x, h, c, w, bias, p, (1, 1, 1))
    h_out, gates = torch.empty_like(c), torch.empty(2, 16, 3, 4, 5)
    if pixel_major:
        gates = gates.movedim(1, -1).contiguous().movedim(-1, 1)
    c_out = torch.empty_like(c)
    assert native_step.step_into(x, h, c, w, bias, p, (1, 1, 1), h_out=h_out, c_out=c_out,
                                 gates=gates, pixel_major=pixel_major)
    _close((h_out.contiguous(), c_out.contiguous()), want)


@pytest.fixture
def three_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def _column_threads():
    return {found[0].threads for found in native_step._PLANS.values()
            if isinstance(found, tuple) and not found[0].winograd}


@pytest.mark.parametrize("pixel_major", [False, True])
@pytest.mark.parametrize(("spatial", "b"), [((3, 4, 5), 2), ((7, 5), 1), ((11,), 3)])
def test_threads_share_a_steps_column_tiles(monkeypatch, three_threads, pixel_major, spatial,
                                            b):
    # Three threads (the share thresholds lowered to these frames), tiles of one output row:
    # 12, 7 and 1 rows (a 1-d frame is one row: one share), so some threads get more tiles
    # than others; the gate update's rows shared by as many threads. Each builds its
    # own columns; the products add onto the bias where they are.
    monkeypatch.setattr(native_step, "COLUMN_THREAD_MACS", 1)
    monkeypatch.setattr(native_gates, "ELEMENTS_PER_THREAD", 1)  # (the gate rows shared too)
    monkeypatch.setattr(native_step, "TILE_FLOATS", 1)
    monkeypatch.setattr(native_step, "_PLANS", {})
    x, h, c, w, bias, p = _case(b, 2, 4, spatial, 3, True, seed=8)
    if pixel_major:
        x, h, c = (t.movedim(1, -1).contiguous().movedim(-1, 1) for t in (x, h, c))
    want = _want(x, h, c, w, bias, p, (1,) * len(spatial))
    h_out, c_out = torch.empty_like(c), torch.empty_like(c)
    assert native_step.step_into(x, h, c, w, bias, p, (1,) * len(spatial), h_out=h_out,
                                 c_out=c_out, pixel_major=pixel_major)
    _close((h_out.contiguous(), c_out.contiguous()), want)
    rows = math.prod(spatial[:-1])
    assert _column_threads() == ({min(3, rows)} if native_build.parallel() else {1})
    gate_rows = math.prod(spatial) if pixel_major else 4  # (pixels, or hidden channels)
    assert {found[0].gate_threads for found in native_step._PLANS.values()
            if isinstance(found, tuple) and not found[0].winograd} == (
        {min(3, rows, gate_rows)} if native_build.parallel() else {1})


def test_the_columns_limit_is_a_threads_when_threads_share_the_tiles(monkeypatch,
                                                                    three_threads):
    # rows 6 * 9 = 54, 6 x 5 pixels: 1620 column floats, past a limit of 600 for one thread,
    # within it for each of three (two output rows each).
    monkeypatch.setattr(native_step, "COLUMN_THREAD_MACS", 1)
    monkeypatch.setattr(native_step, "MAX_COLUMN_FLOATS", 600)
    monkeypatch.setattr(native_step, "_PLANS", {})
    x, h, c, w, bias, p = _case(1, 2, 4, (6, 5), 3, True, seed=10)
    want = _want(x, h, c, w, bias, p, (1, 1))
    h_out, c_out = torch.empty_like(c), torch.empty_like(c)
    served = native_step.step_into(x, h, c, w, bias, p, (1, 1), h_out=h_out, c_out=c_out)
    assert served == native_build.parallel()
    if served:
        _close((h_out, c_out), want)
    torch.set_num_threads(1)
    assert not native_step.step_into(x, h, c, w, bias, p, (1, 1), h_out=h_out, c_out=c_out)


def test_a_step_on_one_thread_or_without_openmps_workers_is_not_shared(monkeypatch,
                                                                      three_threads):
    # torch's thread count is part of the plan's key; a forked child (no OpenMP workers
    # there) runs the tiles on its one thread.
    monkeypatch.setattr(native_step, "COLUMN_THREAD_MACS", 1)
    monkeypatch.setattr(native_step, "_PLANS", {})
    x, h, c, w, bias, p = _case(1, 2, 4, (6, 6), 3, False, seed=9)
    want = _want(x, h, c, w, bias, p, (1, 1))

    def step():
        h_out, c_out = torch.empty_like(c), torch.empty_like(c)
        assert native_step.step_into(x, h, c, w, bias, p, (1, 1), h_out=h_out, c_out=c_out)
        _close((h_out, c_out), want)

    step()
    torch.set_num_threads(1)
    step()
    assert _column_threads() == ({3, 1} if native_build.parallel() else {1})
    torch.set_num_threads(3)
    monkeypatch.setattr(native_build, "parallel", lambda: False)
    native_step._PLANS.clear()
    step()
    assert _column_threads() == {1}


@pytest.mark.parametrize(("cls", "spatial"), [(ConvLSTM, (6, 6)), (ConvLSTM3d, (3, 4, 4))])
@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("given_state", [False, True])
def test_the_loops_unmasked_steps_in_one_loop_of_calls_equal_the_step_by_step_calls(
        monkeypatch, cls, spatial, steps, given_state):
    # steps_into makes the same C calls as step_into, its checks and plans made once: the
    # same bits, in inference and training (saved gates and cells), with h0/c0 or the zero
    # state, peepholes, and lengths (the leading steps before the first sample's end).
    torch.manual_seed(6)
    model = cls(2, 4, 3, 1, batch_first=True, peephole=True)
    x = torch.randn(3, steps, 2, *spatial, requires_grad=True)
    state = [tuple(torch.randn(3, 4, *spatial) for _ in range(2))] if given_state else None
    lengths = torch.tensor([steps, max(1, steps - 2), steps])
    ran = []
    into = native_step.steps_into
    monkeypatch.setattr(native_step, "steps_into",
                        lambda *a, **k: ran.append(into(*a, **k)) or ran[-1])

    def run(**kw):
        with torch.no_grad():
            inferred = model(x, state, **kw)
        out, last = model(x, state, **kw)
        (out[0].square().sum() + last[0][1].sum()).backward()
        grads = [x.grad.clone(), *(p.grad.clone() for p in model.parameters())]
        x.grad = None
        model.zero_grad()
        return [inferred[0][0], *inferred[1][0], out[0].detach(), *grads]

    for kw in ({}, {"lengths": lengths}):
        ran.clear()
        looped = run(**kw)
        want = min(steps, int(lengths.min())) if kw else steps
        assert ran and all(n == want for n in ran), (ran, want)
        monkeypatch.setattr(native_step, "steps_into", lambda *a, **k: 0)
        for got, expected in zip(looped, run(**kw)):
            assert torch.equal(got, expected)
        monkeypatch.setattr(native_step, "steps_into",
                            lambda *a, **k: ran.append(into(*a, **k)) or ran[-1])


def test_the_loop_of_calls_declines_what_it_does_not_serve():
    h_seq, c_seq, c_last = torch.zeros(2, 1, 4, 3, 3), torch.zeros(1, 1, 4, 3, 3), torch.zeros(
        1, 4, 3, 3)
    frames, w = torch.randn(2, 1, 2, 3, 3), torch.randn(16, 6, 3, 3)
    kw = dict(h_seq=h_seq, c_seq=c_seq, c_last=c_last, z_seq=None, save=True,
              pixel_major=False)
    c0 = torch.zeros(1, 4, 3, 3)
    assert native_step.steps_into(frames, 0, None, c0, w, None, None, (1, 1), **kw) == 0
    assert native_step.steps_into(frames.double(), 2, None, c0, w, None, None, (1, 1),
                                  **kw) == 0
    assert native_step.steps_into(frames, 2, None, c0, w, torch.randn(15), None, (1, 1),
                                  **kw) == 0  # a bias of the wrong size
    assert not h_seq.any() and not c_seq.any()  # nothing written
    assert native_step.steps_into(frames, 2, None, c0, w, None, None, (1, 1), **kw) == 2
    assert h_seq.any()
