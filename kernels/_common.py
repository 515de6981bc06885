"""What the kernel modules share: the jitted activations and ConvLSTM cell update (one copy of
the math for :mod:`.gates` and :mod:`.fused_step`), and the launchers' plumbing: the served
dtypes, the argument check, merged (batch, channel, pixel) strides of (B, C, *spatial)
tensors (1 to 3 spatial dims) and the device context.

The jitted helpers take fp32 tiles of [pixels, hidden channels] (BLOCK_P or BLOCK_M by
BLOCK_C) and [1, BLOCK_C] fp32 peephole rows; gates in the order i, f, o, g.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

SERVED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


# ---- the math (jitted) -------------------------------------------------------------------------


@triton.jit
def sigmoid(x: tl.tensor) -> tl.tensor:
    """The logistic function, safe for every finite x."""
    # 1/(1+exp(-x)): for x < -88 exp overflows to +inf and the quotient is exactly 0, so every
    # finite x is safe (exp(x)/(1+exp(x)) would give inf/inf = NaN for x > 88).
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x: tl.tensor) -> tl.tensor:
    """tanh to ~4e-7 relative everywhere, also near 0."""
    # No tl.tanh in the interpreter; tanh(x) = 2*sigmoid(2x) - 1 inherits sigmoid's safety, but
    # near 0 the subtraction cancels: its ~1e-7 absolute error is 1e-4 relative at |x| = 1e-3.
    # There the odd Taylor series through x^11 takes over (truncation below 1e-7 relative for
    # |x| < 0.4, beyond which the sigmoid form is within ~4e-7). Both are computed: the kernels
    # are memory-bound, and a NaN still takes the sigmoid form and stays NaN.
    x2 = x * x
    series = 62.0 / 2835.0 + x2 * (-1382.0 / 155925.0)
    series = 1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * series)))
    return tl.where(tl.abs(x) < 0.4, x * series, 2.0 * sigmoid(2.0 * x) - 1.0)


@triton.jit
def _peephole_row(pe_ptr, k, ch, cmask, s_pe_k, s_pe_c):
    return tl.load(pe_ptr + k * s_pe_k + ch * s_pe_c, mask=cmask, other=0.0).to(tl.float32)[None, :]


@triton.jit
def load_peepholes(
    pe_ptr: tl.tensor, ch: tl.tensor, cmask: tl.tensor, s_pe_k: tl.tensor, s_pe_c: tl.tensor,
    HAS_PEEP: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor]:  # fmt: skip
    """The (3, hidden) peepholes' rows i, f, o at channels ``ch`` (masked by ``cmask``; strides
    s_pe_k between rows, s_pe_c between channels), each a [1, BLOCK_C] fp32 row; zeros without
    peepholes (never read then: the helpers below skip them, and the compiler drops them)."""
    if HAS_PEEP:
        p_i = _peephole_row(pe_ptr, 0, ch, cmask, s_pe_k, s_pe_c)
        p_f = _peephole_row(pe_ptr, 1, ch, cmask, s_pe_k, s_pe_c)
        p_o = _peephole_row(pe_ptr, 2, ch, cmask, s_pe_k, s_pe_c)
    else:
        p_i = tl.zeros([1, ch.shape[0]], dtype=tl.float32)
        p_f = p_i
        p_o = p_i
    return p_i, p_f, p_o


@triton.jit
def cell_update(
    zi: tl.tensor, zf: tl.tensor, zo: tl.tensor, zg: tl.tensor, c_prev: tl.tensor,
    p_i: tl.tensor, p_f: tl.tensor, p_o: tl.tensor,
    HAS_PEEP: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor]:  # fmt: skip
    """One ConvLSTM cell update from fp32 pre-activations: returns (h, c), both fp32.

    c = sigmoid(f) * c_prev + sigmoid(i) * tanh(g); h = sigmoid(o) * tanh(c), where with
    peepholes (rows from :func:`load_peepholes`) i and f add p * c_prev and o adds p * c.
    """
    if HAS_PEEP:
        zi += p_i * c_prev
        zf += p_f * c_prev
    c = sigmoid(zf) * c_prev + sigmoid(zi) * tanh(zg)
    if HAS_PEEP:
        zo += p_o * c  # the output gate peeks at the NEW cell
    h = sigmoid(zo) * tanh(c)
    return h, c


@triton.jit
def gate_activations(
    zi: tl.tensor, zf: tl.tensor, zo: tl.tensor, zg: tl.tensor, c_prev: tl.tensor, c: tl.tensor,
    p_i: tl.tensor, p_f: tl.tensor, p_o: tl.tensor,
    HAS_PEEP: tl.constexpr,
) -> tuple[tl.tensor, tl.tensor, tl.tensor, tl.tensor, tl.tensor]:  # fmt: skip
    """The activations :func:`cell_update` formed, recomputed for the backward from the saved
    pre-activations and both cell states: returns (i, f, o, g, tanh(c)), all fp32."""
    if HAS_PEEP:
        zi += p_i * c_prev
        zf += p_f * c_prev
        zo += p_o * c
    return sigmoid(zi), sigmoid(zf), sigmoid(zo), tanh(zg), tanh(c)


# ---- the launchers' plumbing -------------------------------------------------------------------


def on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context making t's CUDA device current (a no-op for CPU tensors)."""
    # Triton launches on the current CUDA device, not on the tensors'.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def check_tensor(name: str, t: torch.Tensor | None, shape: Sequence[int],
                 dtypes: Sequence[torch.dtype], device: torch.device,
                 optional: bool = False) -> None:  # fmt: skip
    """Raise a TypeError/ValueError naming ``name`` unless t is a tensor of ``shape``, one of
    ``dtypes`` and on ``device`` (or None, where ``optional``)."""
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        hint = ""
        if t.dtype == torch.float64:
            hint = " (the kernels do not serve fp64; the torch path does: backend='torch')"
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {names}; got {t.dtype}{hint}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {t.device}")


def merged_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """(batch, channel, pixel) strides of a (B, C, *spatial) tensor (1 to 3 spatial dims) with
    its spatial dims merged into one pixel axis, None if they cannot be (e.g. a crop of a larger
    image, where stride_h != W * stride_w).

    Size-1 spatial dims are ignored (their strides are never multiplied by anything but 0): the
    others merge where each one's stride is the next one's size times its stride, and the pixel
    stride is the innermost one's (the first spatial dim's when every size is 1).
    """
    sb, sc, *spatial = t.stride()
    kept = [(n, s) for n, s in zip(t.shape[2:], spatial) if n != 1]
    for (_, outer), (n, inner) in zip(kept, kept[1:]):
        if outer != n * inner:
            return None
    return sb, sc, kept[-1][1] if kept else spatial[0]
