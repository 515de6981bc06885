"""The Triton gate kernels (kernels/gates.py) against the float64 oracle (gate_oracle.py).

Mostly 2-d (B, C, H, W); the launchers' 1-d (B, C, L) and 3-d (B, C, D, H, W) cases have their
own section. On CPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so
shapes are tiny and odd; the `gpu` cases add real sizes and >2**31-element tensors.
"""

import itertools

import pytest
import torch
from gate_oracle import F64, oracle_backward, oracle_forward, per_channel
from triton_convlstm.kernels._common import merged_strides
from triton_convlstm.kernels.gates import bias_grad_accumulator, gate_backward, gate_forward

from conftest import DEVICE, DEVICE_MARKS

pytestmark = DEVICE_MARKS


def rel_err(actual, expected):
    expected = expected.to(F64)
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.to(F64) - expected).abs().max() / scale).item()


# ---- inputs -----------------------------------------------------------------------------------


def make(shape, layout="nchw", dtype=torch.float32, scale=1.0):
    """Noise of ``shape``; "nhwc": (B, C, *spatial) channels-last (channels_last for 2-d,
    channels_last_3d for 3-d, a (B, L, C) tensor's ``.movedim(-1, 1)`` for 1-d)."""
    t = torch.randn(shape, device=DEVICE, dtype=torch.float32).mul_(scale).to(dtype)
    if layout != "nhwc" or t.dim() < 3:
        return t
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if t.dim() == 5:
        return t.contiguous(memory_format=torch.channels_last_3d)
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def nan_like(t, dtype=None):
    """An output buffer in t's layout, NaN-filled so an unwritten element shows."""
    return torch.full_like(t, float("nan"), dtype=dtype)


def sample(b, hid, spatial, layout, dtype, peep, zh=True, bias=True, scale=1.0):
    """(zx, zh, bias, c_prev, peephole) for frames of the sizes ``spatial`` (1 to 3 of them)."""
    zx = make((b, 4 * hid, *spatial), layout, dtype, scale)
    zh_ = make((b, 4 * hid, *spatial), layout, dtype, scale) if zh else None
    bias_ = make((4 * hid,), dtype=dtype) if bias else None
    c_prev = make((b, hid, *spatial), layout)
    pe = make((3, hid)) if peep else None
    return zx, zh_, bias_, c_prev, pe


def total_z(zx, zh, bias):
    z = zx.to(F64)
    if zh is not None:
        z = z + zh.to(F64)
    if bias is not None:
        z = z + per_channel(bias.to(F64), z)
    return z


def grads_in(c, layout, dh, dh2, dc, dtype=torch.float32):
    mk = lambda flag, dt: make(tuple(c.shape), layout, dt) if flag else None
    return mk(dh, dtype), mk(dh2, dtype), mk(dc, torch.float32)


def summed(c, *gs):
    out = torch.zeros_like(c, dtype=F64)
    for g in gs:
        if g is not None:
            out = out + g.to(F64)
    return out


# ---- fp32 against the oracle: every output and gradient ---------------------------------------

# (zh, bias, dh, dh2, dc): every optional input both present and absent across the set
OPTIONS = {
    "all": (True, True, True, True, True),
    "bare": (False, False, True, False, False),
    "mixed": (True, False, False, True, True),
    "dc-only": (False, True, False, False, True),
}


SHAPES = [(1, 3, 7, 9), (2, 5, 7, 9), (1, 17, 3, 5)]  # (B, hidden, H, W): odd on purpose
# Every layout x peephole x option set; the shapes rotate through the cases.
_COMBOS = itertools.product(("nchw", "nhwc"), (False, True), OPTIONS)
FP32_CASES = [(SHAPES[i % len(SHAPES)], *combo) for i, combo in enumerate(_COMBOS)]


def _fp32_id(case):
    (b, hid, hh, ww), layout, peep, opts = case
    return f"B{b}-hid{hid}-{hh}x{ww}-{layout}-{'peep' if peep else 'nopeep'}-{opts}"


@pytest.mark.parametrize("case", FP32_CASES, ids=_fp32_id)
def test_fp32_matches_oracle(case):
    (b, hid, hh, ww), layout, peep, opts = case
    has_zh, has_bias, has_dh, has_dh2, has_dc = OPTIONS[opts]
    zx, zh, bias, c_prev, pe = sample(b, hid, (hh, ww), layout, torch.float32, peep, has_zh,
                                      has_bias)  # fmt: skip
    h_out, c_out, z_out = nan_like(c_prev), nan_like(c_prev), nan_like(zx)
    h, c, z = gate_forward(zx, zh, bias, c_prev, pe, h_out=h_out, c_out=c_out, z_out=z_out)
    assert h is h_out and c is c_out and z is z_out
    z64 = total_z(zx, zh, bias)
    h_ref, c_ref = oracle_forward(z64, c_prev.to(F64), None if pe is None else pe.to(F64))
    assert rel_err(z, z64) <= 1e-6
    assert rel_err(h, h_ref) <= 1e-5 and rel_err(c, c_ref) <= 1e-5

    dh, dh2, dc = grads_in(c, layout, has_dh, has_dh2, has_dc)
    dz_out, dcp_out = nan_like(zx), nan_like(c_prev)
    dz, dcp, dpe = gate_backward(z, c_prev, c, pe, dh, dh2, dc, dz_out=dz_out,
                                  dc_prev_out=dcp_out)  # fmt: skip
    assert dz is dz_out and dcp is dcp_out
    ref = oracle_backward(z64, c_prev, pe, summed(c, dh, dh2), summed(c, dc))
    assert rel_err(dz, ref[0]) <= 1e-5 and rel_err(dcp, ref[1]) <= 1e-5
    if peep:
        assert dpe.shape == (3, hid) and dpe.dtype == torch.float32
        assert rel_err(dpe, ref[2]) <= 1e-5
    else:
        assert dpe is None


@pytest.mark.parametrize("scale", [1e-2, 1e-4])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_small_activations_keep_fp32_accuracy(layout, scale):
    """Near 0, tanh written as 2*sigmoid(2x) - 1 keeps its ~1e-7 absolute error while tanh
    shrinks with x: small pre-activations and cells (small inputs, small initial weights) came
    out 1e-4 off in relative terms. Every output and gradient must stay fp32-accurate."""
    b, hid, hh, ww = 2, 5, 7, 9
    zx, zh, bias = (make((b, 4 * hid, hh, ww), layout, scale=scale) for _ in range(3))
    bias = bias[0, :, 0, 0].contiguous()
    c_prev, pe = make((b, hid, hh, ww), layout, scale=scale), make((3, hid))
    h, c, z = gate_forward(zx, zh, bias, c_prev, pe, z_out=torch.empty_like(zx))
    z64 = total_z(zx, zh, bias)
    h_ref, c_ref = oracle_forward(z64, c_prev.to(F64), pe.to(F64))
    assert rel_err(h, h_ref) <= 1e-5 and rel_err(c, c_ref) <= 1e-5
    dh, _, dc = grads_in(c, layout, True, False, True)
    dz, dcp, dpe = gate_backward(z, c_prev, c, pe, dh, None, dc)
    ref = oracle_backward(z64, c_prev, pe, summed(c, dh), summed(c, dc))
    assert rel_err(dz, ref[0]) <= 1e-5 and rel_err(dcp, ref[1]) <= 1e-5
    assert rel_err(dpe, ref[2]) <= 1e-5


def test_allocated_outputs_keep_layout():
    for layout, fmt in [("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)]:
        zx, zh, bias, c_prev, pe = sample(2, 4, (3, 5), layout, torch.bfloat16, True)
        h, c, z = gate_forward(zx, zh, bias, c_prev, pe, save_z=True)
        assert h.dtype == torch.bfloat16 and c.dtype == torch.float32 and z.dtype == zx.dtype
        assert all(t.is_contiguous(memory_format=fmt) for t in (h, c, z))
        assert gate_forward(zx, zh, bias, c_prev, pe)[2] is None  # save_z off: no z
        dz, dcp, _ = gate_backward(z, c_prev, c, pe, h, None, None)
        assert dz.dtype == torch.bfloat16 and dcp.dtype == torch.float32
        assert dz.is_contiguous(memory_format=fmt) and dcp.is_contiguous(memory_format=fmt)


# ---- 16-bit loads: at most ~2x the error of the same math run by torch in that dtype ----------


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision(dtype, layout):
    zx, zh, bias, c_prev, pe = sample(2, 5, (7, 9), layout, dtype, True)
    h, c, z = gate_forward(zx, zh, bias, c_prev, pe, save_z=True)
    assert h.dtype == dtype and c.dtype == torch.float32 and z.dtype == dtype
    # Forward: the exact sum; torch in `dtype` sums and runs the math in that dtype too.
    h_ref, c_ref = oracle_forward(total_z(zx, zh, bias), c_prev.to(F64), pe.to(F64))
    h_low, c_low = oracle_forward(zx + zh + bias[:, None, None], c_prev.to(dtype), pe.to(dtype))
    for got, low, ref in [(h, h_low, h_ref), (c, c_low, c_ref)]:
        assert rel_err(got, ref) <= min(2 * rel_err(low, ref) + 1e-5, 1e-2)
    assert rel_err(c, c_ref) <= 1e-5  # the state never leaves fp32
    z64 = z.to(F64)  # the backward oracle sees the same (rounded) z the kernel gets

    dh, dh2, dc = grads_in(c, layout, True, True, True, dtype)
    got = gate_backward(z, c_prev, c, pe, dh, dh2, dc)
    ref = oracle_backward(z64, c_prev, pe, summed(c, dh, dh2), summed(c, dc))
    low = oracle_backward(z64, c_prev, pe, summed(c, dh, dh2), summed(c, dc), dtype)
    assert got[0].dtype == dtype and got[1].dtype == got[2].dtype == torch.float32
    for g, lo, r in zip(got, low, ref):
        assert rel_err(g, r) <= min(2 * rel_err(lo, r) + 1e-5, 1e-2)


# ---- layouts: slices of larger buffers, in place, exotic strides ----------------------------


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_strided_slices_of_sequence_buffers(layout):
    """Inputs and outputs are steps of (T, B, C, H, W) buffers; other steps stay untouched."""
    t, b, hid, hh, ww = 3, 2, 5, 7, 9
    seq = lambda ch: make((t * b, ch, hh, ww), layout).unflatten(0, (t, b))
    zx_seq, zh_seq, c_seq = seq(4 * hid), seq(4 * hid), seq(hid)
    zx, zh, c_prev, pe = zx_seq[1], zh_seq[2], c_seq[0], make((3, hid))
    h_buf, c_buf, z_buf = (torch.full_like(s, float("nan")) for s in (c_seq, c_seq, zx_seq))
    gate_forward(zx, zh, None, c_prev, pe, h_out=h_buf[1], c_out=c_buf[1], z_out=z_buf[1])
    z64 = total_z(zx, zh, None)
    h_ref, c_ref = oracle_forward(z64, c_prev.to(F64), pe.to(F64))
    assert rel_err(h_buf[1], h_ref) <= 1e-5 and rel_err(c_buf[1], c_ref) <= 1e-5
    assert rel_err(z_buf[1], z64) <= 1e-6
    for buf in (h_buf, c_buf, z_buf):
        assert buf[0].isnan().all() and buf[2].isnan().all()

    dz_buf, dcp_buf = torch.full_like(z_buf, float("nan")), torch.full_like(c_buf, float("nan"))
    dh = make((b, hid, hh, ww), layout)
    gate_backward(z_buf[1], c_prev, c_buf[1], pe, dh, None, None, dz_out=dz_buf[2],
                   dc_prev_out=dcp_buf[0])  # fmt: skip
    ref = oracle_backward(z64, c_prev, pe, dh.to(F64), torch.zeros_like(c_ref))
    assert rel_err(dz_buf[2], ref[0]) <= 1e-5 and rel_err(dcp_buf[0], ref[1]) <= 1e-5
    assert dz_buf[:2].isnan().all() and dcp_buf[1:].isnan().all()


def test_channel_slice_and_uncropped_layouts():
    """zx as a channel slice (mergeable H, W) and as a spatial crop (copied once), outputs
    that are spatial crops (written through a stand-in)."""
    b, hid, hh, ww = 2, 3, 5, 6
    zx = make((b, 4 * hid + 2, hh, ww))[:, 1:-1]
    zh = make((b, 4 * hid, hh + 2, ww + 3))[..., 1:-1, 2:-1]
    c_prev = make((b, hid, hh, ww), "nhwc")
    h_big = torch.full((b, hid, hh + 1, ww + 1), float("nan"), device=DEVICE)
    h, c, _ = gate_forward(zx, zh, None, c_prev, None, h_out=h_big[..., 1:, 1:])
    h_ref, c_ref = oracle_forward(total_z(zx, zh, None), c_prev.to(F64))
    assert rel_err(h, h_ref) <= 1e-5 and rel_err(c, c_ref) <= 1e-5
    assert h_big[..., 0, :].isnan().all() and h_big[..., :, 0].isnan().all()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_in_place_state_updates(layout):
    zx, zh, bias, c_prev, pe = sample(2, 5, (7, 9), layout, torch.float32, True)
    h0, c0, z = gate_forward(zx, zh, bias, c_prev, pe, save_z=True)
    state = c_prev.clone()
    _, c1, _ = gate_forward(zx, zh, bias, state, pe, c_out=state)
    assert c1 is state and torch.equal(c1, c0)

    dh, _, dc = grads_in(c0, layout, True, False, True)
    dz0, dcp0, dpe0 = gate_backward(z, c_prev, c0, pe, dh, None, dc)
    grad = dc.clone()
    _, dcp1, dpe1 = gate_backward(z, c_prev, c0, pe, dh, None, grad, dc_prev_out=grad)
    assert dcp1 is grad and torch.equal(dcp1, dcp0) and torch.equal(dpe1, dpe0)


# ---- 1-d (B, C, L) and 3-d (B, C, D, H, W) ---------------------------------------------------

SPATIAL = {"1d": (13,), "3d": (2, 3, 5)}
ND_CASES = list(itertools.product(SPATIAL, ("nchw", "nhwc"), (False, True)))


def as_2d(t):
    """t (B, C, *spatial) as the 2-d (B, C, pixels, 1) view of the same memory (None stays)."""
    return None if t is None else t.flatten(2).unsqueeze(-1)


@pytest.mark.parametrize("dims,layout,peep", ND_CASES,
                         ids=lambda v: v if isinstance(v, str) else ("peep" if v else "nopeep"))
def test_1d_and_3d_match_oracle_and_the_2d_launch(dims, layout, peep):
    """Every output and gradient (dh2 and the bias accumulator included) against the oracle,
    and bitwise against the 2-d launch of the same memory seen as (B, C, pixels, 1): the kernels
    are pointwise over the merged pixel axis, so the spatial rank must not matter."""
    b, hid, spatial = 2, 3, SPATIAL[dims]
    zx, zh, bias, c_prev, pe = sample(b, hid, spatial, layout, torch.float32, peep)
    assert merged_strides(zx) is not None and (zx.stride(1) == 1) == (layout == "nhwc")
    h, c, z = gate_forward(zx, zh, bias, c_prev, pe, save_z=True)
    for t, ch in [(h, hid), (c, hid), (z, 4 * hid)]:  # allocated like zx
        assert t.shape == (b, ch, *spatial)
        assert t.stride() == make((b, ch, *spatial), layout).stride()
    z64 = total_z(zx, zh, bias)
    h_ref, c_ref = oracle_forward(z64, c_prev.to(F64), None if pe is None else pe.to(F64))
    assert rel_err(z, z64) <= 1e-6
    assert rel_err(h, h_ref) <= 1e-5 and rel_err(c, c_ref) <= 1e-5

    dh, dh2, dc = grads_in(c, layout, True, True, True)
    acc = bias_grad_accumulator(z)
    dz, dcp, dpe = gate_backward(z, c_prev, c, pe, dh, dh2, dc, dbias_acc=acc)
    assert dz.stride() == z.stride() and dcp.stride() == c.stride()
    ref = oracle_backward(z64, c_prev, pe, summed(c, dh, dh2), summed(c, dc))
    assert rel_err(dz, ref[0]) <= 1e-5 and rel_err(dcp, ref[1]) <= 1e-5
    assert rel_err(acc.sum(0), ref[0].sum((0, *range(2, z.dim())))) <= 1e-5
    assert (dpe is None) if pe is None else rel_err(dpe, ref[2]) <= 1e-5

    flat = gate_forward(*map(as_2d, (zx, zh)), bias, as_2d(c_prev), pe, save_z=True)
    assert all(torch.equal(as_2d(t), f) for t, f in zip((h, c, z), flat))
    acc2 = bias_grad_accumulator(flat[2])
    got2 = gate_backward(flat[2], as_2d(c_prev), flat[1], pe, *map(as_2d, (dh, dh2, dc)),
                         dbias_acc=acc2)  # fmt: skip
    assert torch.equal(as_2d(dz), got2[0]) and torch.equal(as_2d(dcp), got2[1])
    assert torch.equal(acc, acc2) and (dpe is None or torch.equal(dpe, got2[2]))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_3d_crops_are_copied_and_written_through_stand_ins(layout):
    """Spatial crops of larger 3-d buffers (H and W not mergeable): the inputs are copied once,
    the outputs written through contiguous stand-ins; only the crops change."""
    b, hid, (d, hh, ww) = 2, 3, (2, 3, 4)
    crop = lambda t: t[:, :, 1:, 1:-1, :-1]  # noqa: E731
    big = lambda ch: make((b, ch, d + 1, hh + 2, ww + 1), layout)  # noqa: E731
    nan_big = lambda ch: torch.full_like(big(ch), float("nan"))  # noqa: E731
    zx, zh, c_prev = crop(big(4 * hid)), crop(big(4 * hid)), crop(big(hid))
    bias, pe = make((4 * hid,)), make((3, hid))
    assert all(merged_strides(t) is None for t in (zx, zh, c_prev))
    h_buf, c_buf, z_buf = nan_big(hid), nan_big(hid), nan_big(4 * hid)
    h, c, z = gate_forward(zx, zh, bias, c_prev, pe, h_out=crop(h_buf), c_out=crop(c_buf),
                           z_out=crop(z_buf))  # fmt: skip
    z64 = total_z(zx, zh, bias)
    h_ref, c_ref = oracle_forward(z64, c_prev.to(F64), pe.to(F64))
    assert rel_err(z, z64) <= 1e-6
    assert rel_err(h, h_ref) <= 1e-5 and rel_err(c, c_ref) <= 1e-5

    dh = crop(big(hid))
    acc = bias_grad_accumulator(z)
    dz_buf, dcp_buf = nan_big(4 * hid), nan_big(hid)
    gate_backward(z, c_prev, c, pe, dh, None, None, dz_out=crop(dz_buf),
                  dc_prev_out=crop(dcp_buf), dbias_acc=acc)  # fmt: skip
    ref = oracle_backward(z64, c_prev, pe, dh.to(F64), torch.zeros_like(c_ref))
    assert rel_err(crop(dz_buf), ref[0]) <= 1e-5 and rel_err(crop(dcp_buf), ref[1]) <= 1e-5
    assert rel_err(acc.sum(0), ref[0].sum((0, 2, 3, 4))) <= 1e-5
    for buf in (h_buf, c_buf, z_buf, dz_buf, dcp_buf):  # the crop written, nothing else
        assert not crop(buf).isnan().any()
        assert buf.isnan().sum() == buf.numel() - crop(buf).numel()


# ---- robustness --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy exp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_huge_preactivations_stay_finite(dtype):
    b, hid, hh, ww = 2, 5, 3, 4
    sign = lambda shape: torch.randint(0, 2, shape, device=DEVICE).float().mul_(2).sub_(1)
    zx = (sign((b, 4 * hid, hh, ww)) * 1e4).to(dtype)
    c_prev = sign((b, hid, hh, ww)) * 1e4
    pe = make((3, hid))
    h, c, z = gate_forward(zx, None, None, c_prev, pe, save_z=True)
    dz, dcp, dpe = gate_backward(z, c_prev, c, pe, make(c.shape), None, make(c.shape))
    for t in (h, c, dz, dcp, dpe):
        assert torch.isfinite(t).all()
    h_ref, c_ref = oracle_forward(z.to(F64), c_prev.to(F64), pe.to(F64))
    h_tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 h is rounded on the way out
    assert rel_err(c, c_ref) <= 1e-5 and rel_err(h, h_ref) <= h_tol


def test_backward_is_bitwise_deterministic():
    zx, zh, bias, c_prev, pe = sample(3, 17, (9, 11), "nchw", torch.float32, True)
    h, c, z = gate_forward(zx, zh, bias, c_prev, pe, save_z=True)
    dh, dh2, dc = grads_in(c, "nchw", True, True, True)
    first = gate_backward(z, c_prev, c, pe, dh, dh2, dc)
    second = gate_backward(z, c_prev, c, pe, dh, dh2, dc)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bias_gradient_accumulates_over_steps(layout, dtype):
    """dbias_acc sums dz over batch and pixels, adding across calls (one accumulator for all
    steps of a sequence): its row sum is the bias gradient, without a pass over dz."""
    acc, want = None, torch.zeros(4 * 6, dtype=F64, device=DEVICE)
    for step in range(3):
        zx, zh, bias, c_prev, pe = sample(2, 6, (5, 7), layout, dtype, peep=step == 1)
        h, c, z = gate_forward(zx, zh, bias, c_prev, pe, save_z=True)
        dh, dh2, dc = grads_in(c, layout, True, step > 0, True)
        acc = bias_grad_accumulator(z) if acc is None else acc
        dz, _, _ = gate_backward(z, c_prev, c, pe, dh, dh2, dc, dbias_acc=acc)
        # The accumulator sums the fp32 values before dz is rounded to its dtype.
        want += oracle_backward(z, c_prev, pe, summed(c, dh, dh2), dc)[0].sum((0, 2, 3))
    assert torch.isfinite(acc).all()
    # bf16: the saved c came from the unrounded pre-activations, the oracle's from the rounded z.
    assert rel_err(acc.sum(0), want) < (1e-5 if dtype == torch.float32 else 1e-2)


def _bad_calls():
    zx, _, _, c_prev, pe = sample(1, 2, (3, 3), "nchw", torch.float32, True)
    meta = torch.empty(c_prev.shape, device="meta")

    def fwd(zx=zx, zh=None, bias=None, c_prev=c_prev, peephole=None, **kw):
        return lambda: gate_forward(zx, zh, bias, c_prev, peephole, **kw)

    def bwd(z=zx, c_prev=c_prev, c=c_prev, peephole=None, dh=None, dh2=None, dc=None, **kw):
        return lambda: gate_backward(z, c_prev, c, peephole, dh, dh2, dc, **kw)

    yield "fp64-zx", TypeError, "fp64", fwd(zx=zx.double())
    yield "list-zx", TypeError, "zx", fwd(zx=[1.0])
    yield "odd-channels", ValueError, "zx", fwd(zx=zx[:, :7])
    yield "c_prev-shape", ValueError, "c_prev", fwd(c_prev=c_prev[:, :1])
    yield "c_prev-bf16", TypeError, "c_prev", fwd(c_prev=c_prev.bfloat16())
    yield "bias-shape", ValueError, "bias", fwd(bias=zx[0, 0, 0])
    yield "peephole-shape", ValueError, "peephole", fwd(peephole=pe[:2])
    yield "h_out-dtype", TypeError, "h_out", fwd(h_out=c_prev.half())
    yield "c_prev-device", ValueError, "c_prev", fwd(c_prev=meta)
    yield "z-fp64", TypeError, "fp64", bwd(z=zx.double())
    yield "dh-shape", ValueError, "dh", bwd(dh=zx)
    yield "dz_out-dtype", TypeError, "dz_out", bwd(dz_out=zx.half())
    acc = bias_grad_accumulator(zx)
    yield "dbias_acc-shape", ValueError, "dbias_acc", bwd(dbias_acc=acc[:, :4])
    yield "dbias_acc-dtype", TypeError, "dbias_acc", bwd(dbias_acc=acc.double())
    yield "dbias_acc-strides", ValueError, "dbias_acc", bwd(dbias_acc=acc.repeat(1, 2)[:, ::2])
    # spatial ranks: 1 to 3 dims, the same in every tensor of a call
    yield "no-spatial-zx", ValueError, "zx", fwd(zx=zx[:, :, 0, 0])
    yield "4d-spatial-zx", ValueError, "zx", fwd(zx=zx[..., None, None])
    yield "3d-c_prev", ValueError, "c_prev", fwd(c_prev=c_prev[..., None])
    yield "1d-h_out", ValueError, "h_out", fwd(h_out=c_prev.flatten(2))
    yield "1d-z", ValueError, "c_prev", bwd(z=zx.flatten(2))
    yield "3d-dh", ValueError, "dh", bwd(dh=c_prev[:, :, None])
    yield "4d-spatial-z-acc", ValueError, r"\*spatial", lambda: bias_grad_accumulator(
        zx[..., None, None])
    lengths = torch.ones(1, dtype=torch.int64, device=zx.device)
    yield "lengths-float", TypeError, "lengths", fwd(lengths=lengths.float())
    yield "lengths-shape", ValueError, "lengths", fwd(lengths=lengths.repeat(2))
    yield "lengths-device", ValueError, "lengths", bwd(lengths=lengths.to("meta"))


@pytest.mark.parametrize("case", list(_bad_calls()), ids=lambda c: c[0])
def test_bad_inputs_raise(case):
    _, exc, word, call = case
    with pytest.raises(exc, match=word):
        call()


# ---- variable lengths: steps past a sample's end ------------------------------------------------


@pytest.mark.parametrize("impl", ["kernel", "torch"])
@pytest.mark.parametrize("peep", [False, True], ids=["plain", "peephole"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_lengths_mask_the_steps_past_each_end(layout, peep, impl):
    """With lengths (3, 1, 2) at step 1, sample 1 is past its end: its cell is kept (in place
    too), its h is zero, and the backward gives it dz = 0, dc_prev = dc and no peephole or
    bias share, even with a NaN output gradient there. The other samples are the unmasked
    update, bit for bit. The kernel and its torch twin (the CPU path) alike."""
    from triton_convlstm.gate_launchers import gate_launchers

    fwd, bwd = gate_launchers("triton" if impl == "kernel" else "torch")
    zx, zh, bias, c_prev, pe = sample(3, 4, (3, 5), layout, torch.float32, peep)
    lengths = torch.tensor([3, 1, 2], device=zx.device)
    gdt = torch.float32
    kw = dict(lengths=lengths, step=1)
    h_ref, c_ref, z_ref = fwd(zx, zh, bias, c_prev, pe, h_out=torch.empty_like(c_prev),
                              c_out=torch.empty_like(c_prev), z_out=torch.empty_like(zx, dtype=gdt),
                              save_z=True)
    c_in_place = c_prev.clone()
    h, c, z = fwd(zx, zh, bias, c_in_place, pe, h_out=torch.empty_like(c_prev),
                  c_out=c_in_place, z_out=torch.empty_like(zx, dtype=gdt), save_z=True, **kw)
    keep = [0, 2]
    assert torch.equal(h[keep], h_ref[keep]) and torch.equal(c[keep], c_ref[keep])
    assert torch.equal(c[1], c_prev[1]) and not h[1].any()

    dh, dc = torch.randn_like(c_prev), torch.randn_like(c_prev)
    dh[1] = float("nan")
    acc = bias_grad_accumulator(zx) if impl == "kernel" else None

    def backward(z, c_new, dh, **kw):
        return bwd(z, c_prev, c_new, pe, dh, None, dc.clone(), dz_out=torch.empty_like(z),
                   dc_prev_out=torch.empty_like(c_prev), **kw)

    dz_ref, dcp_ref, _ = backward(z_ref, c_ref, dh.nan_to_num())
    dz, dcp, dpe = backward(z, c, dh, dbias_acc=acc, **kw)
    assert torch.equal(dz[keep], dz_ref[keep]) and torch.equal(dcp[keep], dcp_ref[keep])
    assert not dz[1].any() and torch.equal(dcp[1], dc[1])
    if peep:  # the masked sample adds nothing: the sums over the other two alone
        _, _, dpe_keep = bwd(z[keep], c_prev[keep], c[keep], pe, dh[keep], None, dc[keep],
                             dz_out=torch.empty_like(z[keep]),
                             dc_prev_out=torch.empty_like(c_prev[keep]))
        assert torch.allclose(dpe, dpe_keep, rtol=1e-5, atol=1e-6)
    if acc is not None:
        assert torch.allclose(acc.sum(0), dz.double().sum((0, 2, 3)).float(), atol=1e-5)


# ---- GPU: real sizes and int64 offsets ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hid", [64, 48])
def test_real_sizes(hid, dtype, layout):
    zx, zh, bias, c_prev, pe = sample(16, hid, (64, 64), layout, dtype, True)
    h, c, z = gate_forward(zx, zh, bias, c_prev, pe, save_z=True)
    # the forward works on the exact fp32 sum; the backward sees the saved (rounded) z
    h_ref, c_ref = oracle_forward(total_z(zx, zh, bias), c_prev.to(F64), pe.to(F64))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(h, h_ref) <= tol and rel_err(c, c_ref) <= 1e-5
    dh, dh2, dc = grads_in(c, layout, True, True, True, dtype)
    got = gate_backward(z, c_prev, c, pe, dh, dh2, dc)
    ref = oracle_backward(z.to(F64), c_prev, pe, summed(c, dh, dh2), summed(c, dc))
    for g, r in zip(got, ref):
        assert rel_err(g, r) <= tol
    again = gate_backward(z, c_prev, c, pe, dh, dh2, dc)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 128, 2048, 2056), (33000, 16, 32, 32)],
                         ids=["one-image-over-2**31", "batch-over-2**31"])  # fmt: skip
def test_int64_offsets(shape):
    """zx has > 2**31 elements: per image (int64 tile offsets) or across the batch."""
    b, hid, hh, ww = shape
    assert b * 4 * hid * hh * ww > 2**31
    zx = torch.randn((b, 4 * hid, hh, ww), device=DEVICE, dtype=torch.bfloat16)
    c_prev = torch.randn((b, hid, hh, ww), device=DEVICE)
    pe = make((3, hid))
    h, c, z = gate_forward(zx, None, None, c_prev, pe, save_z=True)
    dz, dcp, _ = gate_backward(z, c_prev, c, pe, h, None, None)
    for sl in [(slice(0, 1), ..., slice(0, 2), slice(None)), (slice(-1, None), ..., slice(-2, None),
                                                              slice(None))]:  # fmt: skip
        h_ref, c_ref = oracle_forward(zx[sl].to(F64), c_prev[sl].to(F64), pe.to(F64))
        assert rel_err(h[sl], h_ref) <= 1e-2 and rel_err(c[sl], c_ref) <= 1e-5
        ref = oracle_backward(zx[sl].to(F64), c_prev[sl], pe, h[sl].to(F64),
                              torch.zeros_like(c_ref))  # fmt: skip
        assert rel_err(dz[sl], ref[0]) <= 1e-2 and rel_err(dcp[sl], ref[1]) <= 1e-5
