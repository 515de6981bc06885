"""One whole ConvLSTM step forward in one Triton kernel: the convolution of [x_t, h_{t-1}] as an
implicit GEMM, with the gate update as its epilogue (experimental; see docs/PERF_NOTES.md).

The split path (cuDNN convolutions, then kernels/gates.py) writes each step's pre-activations
to memory and reads them back: per hidden element 16 of the ~34 bytes a step moves, and at
M inference that pass is most of the distance to the convolutions alone. Here each program
accumulates the four gates' pre-activations of a [BLOCK_M pixels x BLOCK_C channels] tile in
registers (one [BLOCK_M, 4*BLOCK_C] dot per K slice), then adds the bias and peepholes,
updates the cell and writes h and c (and z, the pre-activations, when the backward needs them:
the same buffer the split path saves, so the backward is shared). No x-convolution over all
steps, no zx, no zh.

The weight is read packed (:func:`pack_weight`): row (segment, ky, kx, channel), column
4 * c + gate, with segment x first, then h. "Same" padding as triton_convlstm.conv (an even
kernel pads one more at the bottom/right): taps outside the image read zero.

CUDA tensors (CPU ones only under TRITON_INTERPRET=1); 3 input channels, hidden 2, the zero
state:

>>> dev = "cuda" if torch.cuda.is_available() else "cpu"
>>> x_t, weight = torch.randn(1, 3, 5, 5, device=dev), torch.randn(8, 5, 3, 3, device=dev)
>>> w = pack_weight(weight, 3)
>>> c_prev, h, c = (torch.zeros(1, 2, 5, 5, device=dev) for _ in range(3))
>>> h, c, _ = fused_step(x_t, None, w, None, c_prev, None, h_out=h, c_out=c, kernel=(3, 3),
...                      dilation=(1, 1))
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import cudnn_conv_tf32
from ._common import (
    SERVED_DTYPES,
    cell_update,
    check_tensor,
    load_peepholes,
    merged_strides,
    on_device_of,
)

NUM_WARPS = 4


@triton.jit
def _segment(acc, src, s_b, s_c, s_h, s_w, w_ptr, s_wk, b, py, px, pmask, HH, WW, cols,
             cols_mask, PAD_H, PAD_W, DIL_H, DIL_W, CH: tl.constexpr, ROW0: tl.constexpr,
             KH: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
             DOT_TY: tl.constexpr):  # fmt: skip
    """acc += this segment's (x_t's or h's) taps: for each of the KH*KW shifts, the pixels'
    shifted CH-channel rows (zero outside the image) times the weight's rows for that shift,
    at the weight columns ``cols`` (the tile's channels, four gates each)."""
    # One flat loop over (tap, K slice), not unrolled (9 taps x CH / BLOCK_K unrolled dots took
    # a minute to compile) and not nested, so that Triton's pipelining (num_stages loads in
    # flight) spans taps also where a segment needs several K slices. (Where it needs one, the
    # nested form compiled to the same cp.async pipeline.)
    NK: tl.constexpr = (CH + BLOCK_K - 1) // BLOCK_K
    for it in range(KH * KW * NK):
        tap = it // NK
        kk = (it % NK) * BLOCK_K + tl.arange(0, BLOCK_K)
        iy = py - PAD_H + (tap // KW) * DIL_H
        ix = px - PAD_W + (tap % KW) * DIL_W
        inside = pmask & (iy >= 0) & (iy < HH) & (ix >= 0) & (ix < WW)
        kmask = kk < CH
        a = tl.load((src + b * s_b + iy * s_h + ix * s_w)[:, None] + kk[None, :] * s_c,
                    mask=inside[:, None] & kmask[None, :], other=0.0).to(DOT_TY)
        w = tl.load(w_ptr + (ROW0 + tap * CH + kk)[:, None] * s_wk + cols[None, :],
                    mask=kmask[:, None] & cols_mask[None, :], other=0.0).to(DOT_TY)
        acc = tl.dot(a, w, acc, input_precision=PREC)
    return acc


@triton.jit
def _fused_step_kernel(
    x_ptr, h_ptr, w_ptr, bias_ptr, cp_ptr, pe_ptr, ho_ptr, co_ptr, z_ptr,
    HH, WW, NPB, PAD_H, PAD_W, DIL_H, DIL_W,
    s_x_b, s_x_c, s_x_h, s_x_w, s_h_b, s_h_c, s_h_h, s_h_w, s_wk, s_bias,
    s_cp_b, s_cp_c, s_cp_p, s_pe_k, s_pe_c, s_ho_b, s_ho_c, s_ho_p, s_co_b, s_co_c, s_co_p,
    s_z_b, s_z_c, s_z_p,
    CIN: tl.constexpr, HID: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_H: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_PEEP: tl.constexpr, SAVE_Z: tl.constexpr, PREC: tl.constexpr, DOT_TY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_KX: tl.constexpr,
    BLOCK_KH: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // NPB).to(tl.int64)  # batch offsets 64-bit: frames of (T, B, ...) buffers
    p = (pid % NPB) * BLOCK_M + tl.arange(0, BLOCK_M)
    pmask = p < HH * WW
    py, px = p // WW, p % WW
    ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = ch < HID
    mask = pmask[:, None] & cmask[None, :]

    # One [BLOCK_M, 4*BLOCK_C] accumulator, one dot per K slice (not four narrow ones): the
    # packed weight's columns run channel-major, gate-minor, so the tile's are contiguous.
    cols = tl.program_id(1) * (4 * BLOCK_C) + tl.arange(0, 4 * BLOCK_C)
    cols_mask = cols < 4 * HID
    acc = tl.zeros([BLOCK_M, 4 * BLOCK_C], dtype=tl.float32)
    acc = _segment(acc, x_ptr, s_x_b, s_x_c, s_x_h, s_x_w, w_ptr, s_wk, b, py, px, pmask, HH,
                   WW, cols, cols_mask, PAD_H, PAD_W, DIL_H, DIL_W, CIN, 0, KH, KW, BLOCK_KX,
                   PREC, DOT_TY)  # fmt: skip
    if HAS_H:  # no h at the first step of a zero initial state: its taps are all zero
        acc = _segment(acc, h_ptr, s_h_b, s_h_c, s_h_h, s_h_w, w_ptr, s_wk, b, py, px, pmask,
                       HH, WW, cols, cols_mask, PAD_H, PAD_W, DIL_H, DIL_W, HID, KH * KW * CIN,
                       KH, KW, BLOCK_KH, PREC, DOT_TY)  # fmt: skip
    # Column 4*c + gate -> [BLOCK_M, BLOCK_C, gate // 2, gate % 2] -> the four gates.
    even, odd = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_C, 2, 2]))
    acc_i, acc_o = tl.split(even)
    acc_f, acc_g = tl.split(odd)
    if HAS_BIAS:
        acc_i += tl.load(bias_ptr + ch * s_bias, mask=cmask, other=0.0).to(tl.float32)[None, :]
        acc_f += tl.load(bias_ptr + (ch + HID) * s_bias, mask=cmask,
                         other=0.0).to(tl.float32)[None, :]  # fmt: skip
        acc_o += tl.load(bias_ptr + (ch + 2 * HID) * s_bias, mask=cmask,
                         other=0.0).to(tl.float32)[None, :]  # fmt: skip
        acc_g += tl.load(bias_ptr + (ch + 3 * HID) * s_bias, mask=cmask,
                         other=0.0).to(tl.float32)[None, :]  # fmt: skip
    p2, c2 = p[:, None], ch[None, :]
    if SAVE_Z:  # the pre-activations, as the split path saves them for the shared backward
        zp = z_ptr + b * s_z_b + p2 * s_z_p
        z_ty = z_ptr.dtype.element_ty
        tl.store(zp + c2 * s_z_c, acc_i.to(z_ty), mask=mask)
        tl.store(zp + (c2 + HID) * s_z_c, acc_f.to(z_ty), mask=mask)
        tl.store(zp + (c2 + 2 * HID) * s_z_c, acc_o.to(z_ty), mask=mask)
        tl.store(zp + (c2 + 3 * HID) * s_z_c, acc_g.to(z_ty), mask=mask)

    # Read c_prev before c is written: c_out may be c_prev (same offsets, same program).
    c_prev = tl.load(cp_ptr + b * s_cp_b + p2 * s_cp_p + c2 * s_cp_c, mask=mask,
                     other=0.0).to(tl.float32)  # fmt: skip
    p_i, p_f, p_o = load_peepholes(pe_ptr, ch, cmask, s_pe_k, s_pe_c, HAS_PEEP)
    h, c = cell_update(acc_i, acc_f, acc_o, acc_g, c_prev, p_i, p_f, p_o, HAS_PEEP)
    tl.store(co_ptr + b * s_co_b + p2 * s_co_p + c2 * s_co_c, c, mask=mask)
    tl.store(ho_ptr + b * s_ho_b + p2 * s_ho_p + c2 * s_ho_c,
             h.to(ho_ptr.dtype.element_ty), mask=mask)  # fmt: skip


def pack_weight(weight: torch.Tensor, input_dim: int) -> torch.Tensor:
    """The convolution weight as :func:`fused_step` reads it: the x segment's rows (ky, kx,
    channel), then the h segment's; column 4*c + gate (gates i, f, o, g), so a tile of channels
    holds its four gates side by side.

    Args:
        weight: (4*hid, input_dim + hid, KH, KW) fp32/bf16/fp16 (fused_step's data dtype),
            the convolution weight over [x, h], output channels gate-major (i, f, o, g).
        input_dim: C, x's channel count.

    Returns:
        (KH*KW*(input_dim + hid), 4*hid), contiguous, in weight's dtype.
    """
    hid = weight.shape[0] // 4
    w_x, w_h = weight[:, :input_dim], weight[:, input_dim:]
    rows = torch.cat([w.permute(2, 3, 1, 0).reshape(-1, 4 * hid) for w in (w_x, w_h)])
    return rows.view(-1, 4, hid).transpose(1, 2).reshape(-1, 4 * hid).contiguous()


def _pixel_strides(name: str, t: torch.Tensor) -> tuple[int, int, int]:
    """:func:`merged_strides`, or a ValueError naming ``name`` where H and W cannot be merged
    (at W == 1 the pixel stride is H's)."""
    st = merged_strides(t)
    if st is None:
        raise ValueError(f"{name}: expected H and W mergeable (stride_h == W * stride_w), "
                         f"got strides {t.stride()}")  # fmt: skip
    return st


def _image_extent(t) -> int:
    """The largest offset inside one image of t (B, C, H, W), from its strides: the kernel
    computes in-image offsets in int32 (batch offsets are 64-bit)."""
    return sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))


def _blocks(hid: int, hw: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C): tl.dot needs 16 at least; the fp32 accumulator of 64 x (4 x 32) is
    64 registers a thread at 4 warps. Untuned (no GPU yet)."""
    bm = max(16, min(64, triton.next_power_of_2(hw)))
    return bm, max(16, min(32, triton.next_power_of_2(hid)))


def _block_k(channels: int, itemsize: int) -> int:
    """Input channels per dot for a segment: all of them up to 128 bytes a pixel row (fewer
    loop trips, whole cache lines), at least tl.dot's 16. The bytes bound also bounds shared
    memory: 3 stages of an fp32 64 x 32 input tile and 32 x 128 weight tile are 72 KB, which
    every GPU from sm_80 on has (sm_86/89: 99 KB)."""
    return max(16, min(128 // itemsize, triton.next_power_of_2(channels)))


def fused_step(
    x_t: torch.Tensor,
    h_prev: torch.Tensor | None,
    w_packed: torch.Tensor,
    bias: torch.Tensor | None,
    c_prev: torch.Tensor,
    peephole: torch.Tensor | None,
    *,
    h_out: torch.Tensor,
    c_out: torch.Tensor,
    z_out: torch.Tensor | None = None,
    kernel: tuple[int, int],
    dilation: tuple[int, int],
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One whole ConvLSTM step forward in one launch: the convolution of [x_t, h_prev], then
    the cell update, written to h_out and c_out (and the pre-activations to z_out).

    x_t, h_prev, w_packed, h_out and z_out share a dtype. x_t and h_prev may have any strides;
    c_prev, h_out, c_out and z_out any whose H and W merge. fp32 uses TF32 dots where cuDNN
    convolutions may (backend.cudnn_conv_tf32).

    Args:
        x_t: (B, C, H, W) fp32/bf16/fp16, this step's input.
        h_prev: (B, hid, H, W) in x_t's dtype, or None (a zero state).
        w_packed: (KH*KW*(C + hid), 4*hid) in x_t's dtype, contiguous: :func:`pack_weight`'s.
        bias: (4*hid,) fp32/bf16/fp16 or None.
        c_prev: (B, hid, H, W) fp32, the previous cell state.
        peephole: (3, hid) fp32/bf16/fp16 (rows i, f, o) or None.
        h_out: (B, hid, H, W) in x_t's dtype, where h goes.
        c_out: (B, hid, H, W) fp32, where c goes; may be c_prev itself (in place).
        z_out: (B, 4*hid, H, W) in x_t's dtype, where the pre-activations go (as
            :func:`.gates.gate_forward` saves them for the shared backward), or None.
        kernel: (KH, KW), the convolution's kernel size ("same" padding).
        dilation: (dilation_h, dilation_w).
        config: for tuning (bench/bench_fused_step.py), overrides of BLOCK_M, BLOCK_C (powers
            of two, 16 or more), num_warps, num_stages; None: the defaults.

    Returns:
        (h_out, c_out, z_out).

    Raises:
        TypeError, ValueError: naming the argument of the wrong type, dtype, shape, device or
            layout; ValueError also for images or weights of 2**31 elements or more.
    """
    b, cin, hh, ww = x_t.shape
    hid = w_packed.shape[1] // 4
    kh, kw = kernel
    dev, dt, state = x_t.device, x_t.dtype, (b, hid, hh, ww)
    check_tensor("x_t", x_t, x_t.shape, SERVED_DTYPES, dev)
    check_tensor("h_prev", h_prev, state, (dt,), dev, optional=True)
    check_tensor("w_packed", w_packed, (kh * kw * (cin + hid), 4 * hid), (dt,), dev)
    check_tensor("bias", bias, (4 * hid,), SERVED_DTYPES, dev, optional=True)
    check_tensor("c_prev", c_prev, state, (torch.float32,), dev)
    check_tensor("peephole", peephole, (3, hid), SERVED_DTYPES, dev, optional=True)
    check_tensor("h_out", h_out, state, (dt,), dev)
    check_tensor("c_out", c_out, state, (torch.float32,), dev)
    check_tensor("z_out", z_out, (b, 4 * hid, hh, ww), (dt,), dev, optional=True)
    if not w_packed.is_contiguous():
        raise ValueError("w_packed: expected a contiguous tensor (pack_weight's)")
    if x_t.numel() == 0 or h_out.numel() == 0:
        return h_out, c_out, z_out
    used = [t for t in (x_t, h_prev, c_prev, h_out, c_out, z_out) if t is not None]
    if max(_image_extent(t) for t in used) >= 2**31:
        raise ValueError("fused_step: images of 2**31 elements or more are not served (the "
                         "split path serves them)")  # fmt: skip
    if w_packed.numel() >= 2**31:
        raise ValueError(f"w_packed: weights of 2**31 elements or more are not served, got "
                         f"{w_packed.numel()} (the split path serves them)")
    th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
    hh_ = h_prev if h_prev is not None else h_out
    z_ = z_out if z_out is not None else h_out
    bias_ = bias if bias is not None else c_prev
    pe_ = peephole if peephole is not None else c_prev
    s_pe = peephole.stride() if peephole is not None else (0, 0)
    tiles = dict(zip(("BLOCK_M", "BLOCK_C"), _blocks(hid, hh * ww)), num_warps=NUM_WARPS)
    tiles.update(config or {})
    bm, bc = tiles["BLOCK_M"], tiles["BLOCK_C"]
    npb = triton.cdiv(hh * ww, bm)
    prec = "tf32" if dt == torch.float32 and x_t.is_cuda and cudnn_conv_tf32() else "ieee"
    # The operands' own dtype on a GPU; fp32 in Triton's CPU interpreter, whose dot is wrong
    # for bf16 (numpy has no bf16).
    dot_ty = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    dot_ty = dot_ty[dt] if x_t.is_cuda else tl.float32
    grid = (b * npb, triton.cdiv(hid, bc))
    with on_device_of(x_t):
        _fused_step_kernel[grid](
            x_t, hh_, w_packed, bias_, c_prev, pe_, h_out, c_out, z_,
            hh, ww, npb, th // 2, tw // 2, dilation[0], dilation[1],
            *x_t.stride(), *hh_.stride(), w_packed.stride(0),
            bias.stride(0) if bias is not None else 0,
            *_pixel_strides("c_prev", c_prev), *s_pe, *_pixel_strides("h_out", h_out),
            *_pixel_strides("c_out", c_out), *_pixel_strides("z_out", z_),
            CIN=cin, HID=hid, KH=kh, KW=kw, HAS_H=h_prev is not None, HAS_BIAS=bias is not None,
            HAS_PEEP=peephole is not None, SAVE_Z=z_out is not None, PREC=prec,
            DOT_TY=dot_ty,
            BLOCK_KX=_block_k(cin, x_t.element_size()),
            BLOCK_KH=_block_k(hid, x_t.element_size()), **tiles,
        )  # fmt: skip
    return h_out, c_out, z_out
