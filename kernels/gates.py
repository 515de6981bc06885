"""Triton kernels for the ConvLSTM gate/state update, forward and backward, and their launchers.

The math is :func:`triton_convlstm.reference.gate_forward_ref` / ``gate_backward_ref``, fused
into one pass over memory each way. Both kernels see every tensor as (batch, channel, pixel)
with a stride per axis (the 1, 2 or 3 spatial dims merged into one pixel axis), so one kernel
serves 1-d, 2-d and 3-d layers, channels-first and channels-last, and slices of a larger
(T, B, C, *spatial) buffer without copies. Each program owns a [BLOCK_P pixels x BLOCK_C
channels] tile of the hidden state; Triton specializes stride==1 arguments, so whichever axis
is contiguous gets vectorized, and the launcher shapes the tile so that axis is the long one.

No autotune: the forward may write the cell state in place (c_out is c_prev), which autotune's
repeated launches would corrupt, and autotune must never run during CUDA-graph capture.

CUDA tensors (CPU ones only under TRITON_INTERPRET=1); hidden 2 here:

>>> dev = "cuda" if torch.cuda.is_available() else "cpu"
>>> zx, c_prev = torch.randn(2, 8, 4, 4, device=dev), torch.zeros(2, 2, 4, 4, device=dev)
>>> bias = torch.zeros(8, device=dev)
>>> h, c, z = gate_forward(zx, None, bias, c_prev, None, save_z=True)
>>> dh, dc = torch.ones_like(h), torch.zeros_like(c)
>>> dz, dc_prev, _ = gate_backward(z, c_prev, c, None, dh, None, dc)

1-d (B, C, L) and 3-d (B, C, D, H, W) tensors take the same calls; pointwise, the same pixels
give the same results:

>>> h1, c1, _ = gate_forward(zx.flatten(2), None, bias, c_prev.flatten(2), None)
>>> torch.equal(h1, h.flatten(2)) and torch.equal(c1, c.flatten(2))
True
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..layout import empty_like_layout as _new
from ._common import (
    SERVED_DTYPES,
    cell_update,
    check_tensor,
    gate_activations,
    load_peepholes,
    merged_strides,
    on_device_of,
)

# Hidden-state elements per program: 8 per thread at 4 warps, enough bytes in flight per SM
# for a memory-bound kernel while keeping registers (4 gates + state) modest.
TILE_ELEMS = 1024
NUM_WARPS = 4
_INT32_MAX = 2**31 - 1


@triton.jit
def _tile(HW, HID, NPB, WIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's batch index, pixel and channel index vectors and the tile mask."""
    pid = tl.program_id(0)
    b = (pid // NPB).to(tl.int64)  # batch offsets always 64-bit: slices of (T, B, ...) buffers
    p = (pid % NPB) * BLOCK_P + tl.arange(0, BLOCK_P)
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if WIDE:  # offsets inside one image can pass 2**31
        p = p.to(tl.int64)
        ch = ch.to(tl.int64)
    mask = (p < HW)[:, None] & (ch < HID)[None, :]
    return b, p, ch, mask


@triton.jit
def _preact(zx_ptr, zh_ptr, bias_ptr, z_ptr, gch, mask, cmask, s_zx_c, s_zh_c, s_bias, s_z_c,
            HAS_ZH: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr):  # fmt: skip
    """One gate's pre-activation zx + zh + bias at channels ``gch`` (pointers already at the
    tile's batch and pixels); stores it to z when the backward will need it."""
    zk = tl.load(zx_ptr + gch[None, :] * s_zx_c, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZH:
        zk += tl.load(zh_ptr + gch[None, :] * s_zh_c, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        zk += tl.load(bias_ptr + gch * s_bias, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if SAVE_Z:
        tl.store(z_ptr + gch[None, :] * s_z_c, zk.to(z_ptr.dtype.element_ty), mask=mask)
    return zk


# STEP changes every launch: not specialized (no variant per step value divisible by 16 or 1).
@triton.jit(do_not_specialize=["STEP"])
def _gates_fwd_kernel(
    zx_ptr, zh_ptr, bias_ptr, cp_ptr, pe_ptr, h_ptr, c_ptr, z_ptr, len_ptr,
    HW, HID, NPB, STEP,
    s_zx_b, s_zx_c, s_zx_p, s_zh_b, s_zh_c, s_zh_p, s_bias,
    s_cp_b, s_cp_c, s_cp_p, s_pe_k, s_pe_c,
    s_h_b, s_h_c, s_h_p, s_c_b, s_c_c, s_c_p, s_z_b, s_z_c, s_z_p,
    HAS_ZH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PEEP: tl.constexpr, SAVE_Z: tl.constexpr,
    HAS_LEN: tl.constexpr, WIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    b, p, ch, mask = _tile(HW, HID, NPB, WIDE, BLOCK_P, BLOCK_C)
    cmask = ch < HID
    p2 = p[:, None]
    zx_ptr += b * s_zx_b + p2 * s_zx_p
    zh_ptr += b * s_zh_b + p2 * s_zh_p
    z_ptr += b * s_z_b + p2 * s_z_p

    # The four gates' pre-activations, in order i, f, o, g; the sum is formed in fp32.
    zi = _preact(zx_ptr, zh_ptr, bias_ptr, z_ptr, ch, mask, cmask,
                 s_zx_c, s_zh_c, s_bias, s_z_c, HAS_ZH, HAS_BIAS, SAVE_Z)  # fmt: skip
    zf = _preact(zx_ptr, zh_ptr, bias_ptr, z_ptr, ch + HID, mask, cmask,
                 s_zx_c, s_zh_c, s_bias, s_z_c, HAS_ZH, HAS_BIAS, SAVE_Z)  # fmt: skip
    zo = _preact(zx_ptr, zh_ptr, bias_ptr, z_ptr, ch + 2 * HID, mask, cmask,
                 s_zx_c, s_zh_c, s_bias, s_z_c, HAS_ZH, HAS_BIAS, SAVE_Z)  # fmt: skip
    zg = _preact(zx_ptr, zh_ptr, bias_ptr, z_ptr, ch + 3 * HID, mask, cmask,
                 s_zx_c, s_zh_c, s_bias, s_z_c, HAS_ZH, HAS_BIAS, SAVE_Z)  # fmt: skip

    # Read c_prev before c is written: c_out may be c_prev (same offsets, same program).
    c_prev = tl.load(cp_ptr + b * s_cp_b + p2 * s_cp_p + ch[None, :] * s_cp_c, mask=mask,
                     other=0.0).to(tl.float32)  # fmt: skip
    p_i, p_f, p_o = load_peepholes(pe_ptr, ch, cmask, s_pe_k, s_pe_c, HAS_PEEP)
    h, c = cell_update(zi, zf, zo, zg, c_prev, p_i, p_f, p_o, HAS_PEEP)
    if HAS_LEN:  # past this sample's length: the cell is kept, the output is zero
        valid = STEP < tl.load(len_ptr + b)
        c = tl.where(valid, c, c_prev)
        h = tl.where(valid, h, 0.0)
    tl.store(c_ptr + b * s_c_b + p2 * s_c_p + ch[None, :] * s_c_c, c, mask=mask)
    tl.store(h_ptr + b * s_h_b + p2 * s_h_p + ch[None, :] * s_h_c,
             h.to(h_ptr.dtype.element_ty), mask=mask)  # fmt: skip


@triton.jit
def _row_offset(width):
    """Where this program's row of a per-program partial-sum buffer starts: in int64, since
    rows x width passes 2^31 at large images (one row per 16 pixels in the sequence layout)."""
    return tl.program_id(0).to(tl.int64) * width


@triton.jit
def _accumulate(ptr, value, mask):
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@triton.jit(do_not_specialize=["STEP"])
def _gates_bwd_kernel(
    z_ptr, cp_ptr, c_ptr, pe_ptr, dh_ptr, dh2_ptr, dc_ptr, dz_ptr, dcp_ptr, part_ptr, db_ptr,
    len_ptr, HW, HID, NPB, NROWS, STEP,
    s_z_b, s_z_c, s_z_p, s_cp_b, s_cp_c, s_cp_p, s_c_b, s_c_c, s_c_p, s_pe_k, s_pe_c,
    s_dh_b, s_dh_c, s_dh_p, s_dh2_b, s_dh2_c, s_dh2_p, s_dc_b, s_dc_c, s_dc_p,
    s_dz_b, s_dz_c, s_dz_p, s_dcp_b, s_dcp_c, s_dcp_p,
    HAS_PEEP: tl.constexpr, HAS_DH: tl.constexpr, HAS_DH2: tl.constexpr, HAS_DC: tl.constexpr,
    HAS_DB: tl.constexpr, HAS_LEN: tl.constexpr, WIDE: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    b, p, ch, mask = _tile(HW, HID, NPB, WIDE, BLOCK_P, BLOCK_C)
    cmask = ch < HID
    p2 = p[:, None]
    c2 = ch[None, :]
    z_ptr += b * s_z_b + p2 * s_z_p
    dz_ptr += b * s_dz_b + p2 * s_dz_p
    zi = tl.load(z_ptr + c2 * s_z_c, mask=mask, other=0.0).to(tl.float32)
    zf = tl.load(z_ptr + (c2 + HID) * s_z_c, mask=mask, other=0.0).to(tl.float32)
    zo = tl.load(z_ptr + (c2 + 2 * HID) * s_z_c, mask=mask, other=0.0).to(tl.float32)
    zg = tl.load(z_ptr + (c2 + 3 * HID) * s_z_c, mask=mask, other=0.0).to(tl.float32)
    c_prev = tl.load(cp_ptr + b * s_cp_b + p2 * s_cp_p + c2 * s_cp_c, mask=mask, other=0.0)
    c = tl.load(c_ptr + b * s_c_b + p2 * s_c_p + c2 * s_c_c, mask=mask, other=0.0)
    c_prev = c_prev.to(tl.float32)
    c = c.to(tl.float32)
    p_i, p_f, p_o = load_peepholes(pe_ptr, ch, cmask, s_pe_k, s_pe_c, HAS_PEEP)
    i, f, o, g, tc = gate_activations(zi, zf, zo, zg, c_prev, c, p_i, p_f, p_o, HAS_PEEP)

    dh = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    if HAS_DH:
        dh += tl.load(dh_ptr + b * s_dh_b + p2 * s_dh_p + c2 * s_dh_c, mask=mask,
                      other=0.0).to(tl.float32)  # fmt: skip
    if HAS_DH2:  # the recurrent gradient, summed here instead of in a separate add kernel
        dh += tl.load(dh2_ptr + b * s_dh2_b + p2 * s_dh2_p + c2 * s_dh2_c, mask=mask,
                      other=0.0).to(tl.float32)  # fmt: skip
    dc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    if HAS_DC:
        dc += tl.load(dc_ptr + b * s_dc_b + p2 * s_dc_p + c2 * s_dc_c, mask=mask,
                      other=0.0).to(tl.float32)  # fmt: skip
    if HAS_LEN:
        # Past this sample's length the forward kept the cell and wrote a zero output: as a step
        # with the input and output gates shut and the forget gate open, which the formulas
        # below turn into dz = 0 and dc_prev = dc; the output's gradient goes nowhere.
        valid = STEP < tl.load(len_ptr + b)
        i = tl.where(valid, i, 0.0)
        f = tl.where(valid, f, 1.0)
        o = tl.where(valid, o, 0.0)
        dh = tl.where(valid, dh, 0.0)

    dzo = dh * tc * o * (1.0 - o)
    dc += dh * o * (1.0 - tc * tc)
    if HAS_PEEP:
        dc += dzo * p_o
    dzi = dc * g * i * (1.0 - i)
    dzf = dc * c_prev * f * (1.0 - f)
    dzg = dc * i * (1.0 - g * g)
    dc_prev = dc * f
    if HAS_PEEP:
        dc_prev += dzi * p_i + dzf * p_f
        # Per-program partial sums over this tile's pixels; the launcher sums the rows with
        # torch, so the result is bitwise reproducible (no atomics).
        part = part_ptr + _row_offset(HID) + ch
        zero = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        tl.store(part, tl.sum(tl.where(mask, dzi * c_prev, zero), axis=0), mask=cmask)
        plane = tl.cast(NROWS, tl.int64) * HID
        tl.store(part + plane, tl.sum(tl.where(mask, dzf * c_prev, zero), axis=0), mask=cmask)
        tl.store(part + 2 * plane, tl.sum(tl.where(mask, dzo * c, zero), axis=0), mask=cmask)

    if HAS_DB:
        # The bias gradient without another pass over dz: this tile's column sums, added to
        # its program's row of an accumulator that lives across all steps (each row belongs to
        # one program position, and steps run in stream order: no atomics, reproducible).
        row = db_ptr + _row_offset(4 * HID) + ch
        zero = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        _accumulate(row, tl.sum(tl.where(mask, dzi, zero), axis=0), cmask)
        _accumulate(row + HID, tl.sum(tl.where(mask, dzf, zero), axis=0), cmask)
        _accumulate(row + 2 * HID, tl.sum(tl.where(mask, dzo, zero), axis=0), cmask)
        _accumulate(row + 3 * HID, tl.sum(tl.where(mask, dzg, zero), axis=0), cmask)

    # dc_prev may overwrite dc in place: every read of dc above is done.
    tl.store(dcp_ptr + b * s_dcp_b + p2 * s_dcp_p + c2 * s_dcp_c, dc_prev, mask=mask)
    out_ty = dz_ptr.dtype.element_ty
    tl.store(dz_ptr + c2 * s_dz_c, dzi.to(out_ty), mask=mask)
    tl.store(dz_ptr + (c2 + HID) * s_dz_c, dzf.to(out_ty), mask=mask)
    tl.store(dz_ptr + (c2 + 2 * HID) * s_dz_c, dzo.to(out_ty), mask=mask)
    tl.store(dz_ptr + (c2 + 3 * HID) * s_dz_c, dzg.to(out_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers


def _input(t):
    """t and its merged strides; an exotic layout is copied once (rare, and correct)."""
    st = merged_strides(t)
    if st is None:
        t = t.contiguous()
        st = merged_strides(t)
    return t, st


def _output(out, fixups):
    """The tensor the kernel writes for ``out``: out itself, or a contiguous stand-in that is
    copied into out afterwards (recorded in fixups) when out's spatial dims cannot be merged."""
    st = merged_strides(out)
    if st is not None:
        return out, st
    tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
    fixups.append((tmp, out))
    return tmp, merged_strides(tmp)


def _pixels(t) -> int:
    """The pixel count of one image of t (B, C, *spatial): the product of its spatial sizes."""
    return math.prod(t.shape[2:])


def _wide(tensors_and_strides):
    """True when an offset inside one image can pass int32 (batch offsets are always 64-bit)."""
    for t, (_, sc, sp) in tensors_and_strides:
        if (t.shape[1] - 1) * sc + (_pixels(t) - 1) * sp > _INT32_MAX:
            return True
    return False


def _blocks(channels_contiguous, hid, hw):
    """Tile shape: the contiguous axis long (16-byte vectors, whole 128-byte lines per warp)."""
    hid2, hw2 = triton.next_power_of_2(hid), triton.next_power_of_2(hw)
    if channels_contiguous:  # channels_last: a pixel's hidden channels are adjacent
        bc = min(hid2, 64)
        bp = min(max(TILE_ELEMS // bc, 1), hw2)
    else:  # NCHW: a channel's pixels are adjacent
        bp = min(256, hw2)
        bc = min(max(TILE_ELEMS // bp, 1), hid2)
    return bp, bc


def _dims(name, z):
    """(B, hidden, spatial) of a pre-activation tensor (B, 4*hidden, *spatial), checked:
    spatial is the tuple of its 1 to 3 spatial sizes."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(z).__name__}")
    if z.dim() not in (3, 4, 5) or z.shape[1] % 4:
        raise ValueError(f"{name}: expected shape (B, 4*hidden, *spatial) with 1 to 3 spatial "
                         f"dims, got {tuple(z.shape)}")  # fmt: skip
    check_tensor(name, z, z.shape, SERVED_DTYPES, z.device)
    b, c4, *spatial = z.shape
    return b, c4 // 4, tuple(spatial)


LENGTH_DTYPES = (torch.int64, torch.int32)


def _lengths(lengths, b, dev):
    """The lengths pointer argument (checked), or None."""
    check_tensor("lengths", lengths, (b,), LENGTH_DTYPES, dev, optional=True)
    if lengths is not None and lengths.stride(0) != 1 and b > 1:
        lengths = lengths.contiguous()
    return lengths


def gate_forward(
    zx: torch.Tensor,
    zh: torch.Tensor | None,
    bias: torch.Tensor | None,
    c_prev: torch.Tensor,
    peephole: torch.Tensor | None,
    *,
    h_out: torch.Tensor | None = None,
    c_out: torch.Tensor | None = None,
    z_out: torch.Tensor | None = None,
    save_z: bool = False,
    lengths: torch.Tensor | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One fused gate/state update: z = zx + zh + bias, then the cell update, in one launch.

    Every tensor but bias and peephole is (B, channels, *spatial) with the same 1, 2 or 3
    spatial sizes (L; H, W; D, H, W). Inputs and outputs may have any strides (e.g. slices of a
    (T, B, hidden, *spatial) buffer); missing outputs are allocated laid out like zx.

    Args:
        zx: (B, 4*hidden, *spatial) fp32/bf16/fp16, the input convolution's pre-activations
            (gates i, f, o, g along channels).
        zh: (B, 4*hidden, *spatial) fp32/bf16/fp16, the recurrent convolution's, or None.
        bias: (4*hidden,) fp32/bf16/fp16 or None.
        c_prev: (B, hidden, *spatial) fp32, the previous cell state.
        peephole: (3, hidden) fp32/bf16/fp16 (rows i, f, o) or None.
        h_out: (B, hidden, *spatial) in zx's dtype, where h goes; None allocates it.
        c_out: (B, hidden, *spatial) fp32, where c goes; may be c_prev itself (in place).
        z_out: (B, 4*hidden, *spatial) in zx's dtype, where z goes (implies save_z).
        save_z: keep z for :func:`gate_backward` (in z_out, or a new tensor).

    Returns:
        (h, c, z): h_out, c_out and z_out, z None unless saved.

    Raises:
        TypeError, ValueError: naming the argument of the wrong type, dtype, shape or device.
    """
    b, hid, spatial = _dims("zx", zx)
    dev, state, gates = zx.device, (b, hid, *spatial), tuple(zx.shape)
    check_tensor("zh", zh, gates, SERVED_DTYPES, dev, optional=True)
    check_tensor("bias", bias, (4 * hid,), SERVED_DTYPES, dev, optional=True)
    check_tensor("c_prev", c_prev, state, (torch.float32,), dev)
    check_tensor("peephole", peephole, (3, hid), SERVED_DTYPES, dev, optional=True)
    check_tensor("h_out", h_out, state, (zx.dtype,), dev, optional=True)
    check_tensor("c_out", c_out, state, (torch.float32,), dev, optional=True)
    check_tensor("z_out", z_out, gates, (zx.dtype,), dev, optional=True)
    lengths = _lengths(lengths, b, dev)
    save_z = save_z or z_out is not None
    h_out = _new(zx, hid, zx.dtype) if h_out is None else h_out
    c_out = _new(zx, hid, torch.float32) if c_out is None else c_out
    if save_z and z_out is None:
        z_out = _new(zx, 4 * hid, zx.dtype)
    if zx.numel() == 0:
        return h_out, c_out, z_out

    fixups = []
    zx_, s_zx = _input(zx)
    zh_, s_zh = _input(zh) if zh is not None else (zx_, s_zx)
    cp_, s_cp = _input(c_prev)
    h_, s_h = _output(h_out, fixups)
    c_, s_c = _output(c_out, fixups)
    z_, s_z = _output(z_out, fixups) if save_z else (h_, s_h)
    bias_ = bias if bias is not None else zx_
    pe_ = peephole if peephole is not None else zx_
    s_pe = peephole.stride() if peephole is not None else (0, 0)
    hw = _pixels(zx_)
    bp, bc = _blocks(zx_.stride(1) == 1 and hid > 1, hid, hw)
    npb = triton.cdiv(hw, bp)
    wide = _wide([(zx_, s_zx), (zh_, s_zh), (cp_, s_cp), (h_, s_h), (c_, s_c), (z_, s_z)])
    grid = (b * npb, triton.cdiv(hid, bc))
    with on_device_of(zx_):
        _gates_fwd_kernel[grid](
            zx_, zh_, bias_, cp_, pe_, h_, c_, z_, zx_ if lengths is None else lengths,
            hw, hid, npb, int(step),
            *s_zx, *s_zh, bias_.stride(0) if bias is not None else 0,
            *s_cp, *s_pe, *s_h, *s_c, *s_z,
            HAS_ZH=zh is not None, HAS_BIAS=bias is not None, HAS_PEEP=peephole is not None,
            SAVE_Z=save_z, HAS_LEN=lengths is not None, WIDE=wide, BLOCK_P=bp, BLOCK_C=bc,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    for tmp, out in fixups:
        out.copy_(tmp)
    return h_out, c_out, (z_out if save_z else None)


def _rows(z_, hid: int) -> tuple[int, int, int]:
    """(rows, BLOCK_P, BLOCK_C) of the backward's grid for z_ as the kernel reads it."""
    hw = _pixels(z_)
    bp, bc = _blocks(z_.stride(1) == 1 and hid > 1, hid, hw)
    return z_.shape[0] * triton.cdiv(hw, bp), bp, bc


def bias_grad_accumulator(z: torch.Tensor,
                          device: torch.device | str | None = None) -> torch.Tensor:  # fmt: skip
    """Zeros for :func:`gate_backward`'s ``dbias_acc``: one fp32 row of 4*hidden partial sums
    per backward program, for gates shaped and laid out like z.

    Args:
        z: (B, 4*hidden, *spatial) fp32/bf16/fp16 (1 to 3 spatial dims), shaped and strided
            as the z the backward will read (a meta tensor will do; then pass ``device``).
        device: where to allocate; None: z's device.

    Returns:
        (rows, 4*hidden) fp32 zeros; after the backward steps ``.sum(0)`` is the bias gradient.
    """
    _, hid, _ = _dims("z", z)
    return torch.zeros(_bias_acc_shape(z, hid), dtype=torch.float32, device=device or z.device)


def _bias_acc_shape(z, hid: int) -> tuple[int, int]:
    """The bias accumulator's shape: a row per backward program for z as the kernel reads it."""
    return (_rows(_input(z)[0], hid)[0] if z.numel() else 0), 4 * hid


def gate_backward(
    z: torch.Tensor,
    c_prev: torch.Tensor,
    c: torch.Tensor,
    peephole: torch.Tensor | None,
    dh: torch.Tensor | None,
    dh2: torch.Tensor | None,
    dc: torch.Tensor | None,
    *,
    dz_out: torch.Tensor | None = None,
    dc_prev_out: torch.Tensor | None = None,
    dbias_acc: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    step: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`gate_forward` from its saved z, in one launch.

    Every tensor but peephole and dbias_acc is (B, channels, *spatial) with z's 1, 2 or 3
    spatial sizes. Inputs and outputs may have any strides; missing outputs are allocated laid
    out like z.

    Args:
        z: (B, 4*hidden, *spatial) fp32/bf16/fp16, the pre-activations the forward saved.
        c_prev: (B, hidden, *spatial) fp32, the forward's previous cell state.
        c: (B, hidden, *spatial) fp32, the cell state the forward returned.
        peephole: (3, hidden) fp32/bf16/fp16 or None, as in the forward.
        dh: (B, hidden, *spatial) fp32/bf16/fp16, the gradient w.r.t. h, or None.
        dh2: like dh, a second gradient w.r.t. h (the recurrent one), summed with dh; or None.
        dc: (B, hidden, *spatial) fp32/bf16/fp16, the gradient w.r.t. c, or None.
        dz_out: (B, 4*hidden, *spatial) in z's dtype, where dz goes; None allocates it.
        dc_prev_out: (B, hidden, *spatial) fp32, where dc_prev goes; may be dc itself (in
            place).
        dbias_acc: from :func:`bias_grad_accumulator` (contiguous) or None: dz's sums over
            batch and pixels are added to it, so one accumulator over all steps holds the bias
            gradient, without a pass over dz.
        lengths, step: as the forward's: where the step is past sample b's end its dz is zero
            and dc_prev is dc (dh is not read).

    Returns:
        (dz, dc_prev, dpeephole): dz_out, dc_prev_out and the (3, hidden) fp32 peephole
        gradient (None without peepholes), reduced deterministically (per-program partials
        summed by torch).

    Raises:
        TypeError, ValueError: naming the argument of the wrong type, dtype, shape or device.
    """
    b, hid, spatial = _dims("z", z)
    dev, state = z.device, (b, hid, *spatial)
    check_tensor("c_prev", c_prev, state, (torch.float32,), dev)
    check_tensor("c", c, state, (torch.float32,), dev)
    check_tensor("peephole", peephole, (3, hid), SERVED_DTYPES, dev, optional=True)
    check_tensor("dh", dh, state, SERVED_DTYPES, dev, optional=True)
    check_tensor("dh2", dh2, state, SERVED_DTYPES, dev, optional=True)
    check_tensor("dc", dc, state, SERVED_DTYPES, dev, optional=True)
    check_tensor("dz_out", dz_out, tuple(z.shape), (z.dtype,), dev, optional=True)
    check_tensor("dc_prev_out", dc_prev_out, state, (torch.float32,), dev, optional=True)
    if dbias_acc is not None:
        check_tensor("dbias_acc", dbias_acc, _bias_acc_shape(z, hid), (torch.float32,), dev)
        if not dbias_acc.is_contiguous():
            raise ValueError("dbias_acc: expected a contiguous tensor (bias_grad_accumulator's)")
    lengths = _lengths(lengths, b, dev)
    dz_out = _new(z, 4 * hid, z.dtype) if dz_out is None else dz_out
    dc_prev_out = _new(z, hid, torch.float32) if dc_prev_out is None else dc_prev_out
    has_peep = peephole is not None
    if z.numel() == 0:
        dpe = torch.zeros((3, hid), dtype=torch.float32, device=dev) if has_peep else None
        return dz_out, dc_prev_out, dpe

    fixups = []
    z_, s_z = _input(z)
    cp_, s_cp = _input(c_prev)
    c_, s_c = _input(c)
    dh_, s_dh = _input(dh) if dh is not None else (c_, s_c)
    dh2_, s_dh2 = _input(dh2) if dh2 is not None else (c_, s_c)
    dc_, s_dc = _input(dc) if dc is not None else (c_, s_c)
    dz_, s_dz = _output(dz_out, fixups)
    dcp_, s_dcp = _output(dc_prev_out, fixups)
    hw = _pixels(z_)
    nrows, bp, bc = _rows(z_, hid)
    npb = nrows // b
    part = torch.empty((3, nrows, hid) if has_peep else (1,), dtype=torch.float32, device=dev)
    pe_ = peephole if has_peep else c_
    s_pe = peephole.stride() if has_peep else (0, 0)
    used = [(z_, s_z), (cp_, s_cp), (c_, s_c), (dh_, s_dh), (dh2_, s_dh2), (dc_, s_dc),
            (dz_, s_dz), (dcp_, s_dcp)]  # fmt: skip
    grid = (nrows, triton.cdiv(hid, bc))
    with on_device_of(z_):
        _gates_bwd_kernel[grid](
            z_, cp_, c_, pe_, dh_, dh2_, dc_, dz_, dcp_, part,
            part if dbias_acc is None else dbias_acc, z_ if lengths is None else lengths,
            hw, hid, npb, nrows, int(step),
            *s_z, *s_cp, *s_c, *s_pe, *s_dh, *s_dh2, *s_dc, *s_dz, *s_dcp,
            HAS_PEEP=has_peep, HAS_DH=dh is not None, HAS_DH2=dh2 is not None,
            HAS_DC=dc is not None, HAS_DB=dbias_acc is not None, HAS_LEN=lengths is not None,
            WIDE=_wide(used), BLOCK_P=bp,
            BLOCK_C=bc, num_warps=NUM_WARPS,
        )  # fmt: skip
    for tmp, out in fixups:
        out.copy_(tmp)
    return dz_out, dc_prev_out, (part.sum(1) if has_peep else None)
