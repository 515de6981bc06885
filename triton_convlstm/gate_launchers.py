"""The gate update with one calling convention for both implementations: the Triton kernels'
launchers (:mod:`triton_convlstm.kernels.gates`) and their torch twins here, which the time
loops call on CPU (or where Triton is missing). :func:`gate_launchers` picks the pair. The
twins run the CPU C kernels (:mod:`triton_convlstm.native_gates`) where those serve the call,
else the torch ops of :mod:`triton_convlstm.reference` (the same function).

The calling convention is the launchers': outputs are written into buffers the caller owns
(slices of the sequence's (T, B, ...) buffers), the cell may be updated in place, and the
backward may sum two incoming h gradients. What the forward saves differs, as
:func:`saved_gates_dtype` says: the kernels keep the summed pre-activations, the torch path the
activated gates (so its backward need not recompute them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import native_gates, reference


def saved_gates_dtype(dtype: torch.dtype, backend: str) -> torch.dtype:
    """The dtype the saved gates (z_seq) have for inputs of ``dtype``: the Triton kernels keep
    pre-activations in the compute dtype, the torch path activated gates in the state dtype.

    Args:
        dtype: the inputs' dtype.
        backend: "triton" or "torch".

    Returns:
        ``dtype`` for "triton", else ``reference.state_dtype(dtype)``.

    >>> saved_gates_dtype(torch.bfloat16, "triton"), saved_gates_dtype(torch.bfloat16, "torch")
    (torch.bfloat16, torch.float32)
    """
    return dtype if backend == "triton" else reference.state_dtype(dtype)


def gate_forward_torch(zx: Tensor, zh: Tensor | None, bias: Tensor | None, c_prev: Tensor,
                       peephole: Tensor | None, *, h_out: Tensor, c_out: Tensor,
                       z_out: Tensor | None = None, save_z: bool = False,
                       lengths: Tensor | None = None, step: int = 0,
                       valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`triton_convlstm.kernels.gates.gate_forward` on CPU: the C kernel where it serves
    the call, else torch ops.

    zx, zh and bias are summed in the state dtype, as the kernel sums them.

    Args:
        zx: (B, 4*hidden, H, W), any float dtype: the input convolution's pre-activations
            (gates i, f, o, g along channels).
        zh: (B, 4*hidden, H, W): the hidden convolution's, or None.
        bias: (4*hidden,) or None.
        c_prev: (B, hidden, H, W), state dtype.
        peephole: (3, hidden) (rows i, f, o) or None.
        h_out: (B, hidden, H, W) in zx's dtype: where h goes.
        c_out: (B, hidden, H, W), state dtype: where c goes (may be c_prev: in place).
        z_out: (B, 4*hidden, H, W), state dtype: with save_z, where the activated gates go
            for the backward; required then.
        save_z: keep the activated gates in z_out. Without, zx itself is the scratch where
            its dtype is the state dtype (the caller's temporary), else a new tensor.
        lengths: (B,) integer, on zx's device, or None; step: this step's index. As the
            kernel's: a sample past its end keeps its cell and gets a zero h (and its saved
            gates say so, for the backward).
        valid: instead of lengths and step, the step's multiplier already made
            (:func:`triton_convlstm.reference.step_valid`, in the state dtype).

    Returns:
        (h_out, c_out, z_out).
    """
    sdt = reference.state_dtype(zx.dtype)
    if save_z:
        gates = z_out
    else:
        gates = zx if zx.dtype == sdt else torch.empty_like(zx, dtype=sdt)
    pre = reference.preactivation_ref(zx, zh, bias, out=gates)
    h = h_out if h_out.dtype == sdt else torch.empty_like(h_out, dtype=sdt)
    if valid is None:
        valid = reference.step_valid(lengths, step, gates.dim(), sdt)
    # The C kernel where it serves the call (fp32 CPU tensors), else the same math in torch ops.
    if not native_gates.gate_forward(pre, gates if save_z else None, c_prev, peephole, h, c_out,
                                     valid):
        reference.gate_forward_inplace_ref(gates, c_prev, peephole, h_out=h, c_out=c_out,
                                           pre=pre, valid=valid, keep_g=save_z)
    if h is not h_out:
        h_out.copy_(h)
    return h_out, c_out, z_out


def gate_backward_torch(gates: Tensor, c_prev: Tensor, c: Tensor, peephole: Tensor | None,
                        dh: Tensor | None, dh2: Tensor | None, dc: Tensor | None, *,
                        dz_out: Tensor, dc_prev_out: Tensor, dbias_acc: Tensor | None = None,
                        lengths: Tensor | None = None, step: int = 0,
                        valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`triton_convlstm.kernels.gates.gate_backward` on CPU (the C kernel, else torch
    ops), from the activated gates :func:`gate_forward_torch` saved.

    Args:
        gates: (B, 4*hidden, H, W) activated i, f, o, g, state dtype.
        c_prev: (B, hidden, H, W) the step's previous cell, state dtype.
        c: (B, hidden, H, W) the step's new cell, state dtype.
        peephole: (3, hidden) or None.
        dh: (B, hidden, H, W) the output's gradient (the caller's, read only), or None.
        dh2: (B, hidden, H, W) the recurrent gradient, a scratch of the loop's, which takes the
            sum (no allocation), or None.
        dc: (B, hidden, H, W) the gradient reaching c, or None.
        dz_out: (B, 4*hidden, H, W): where dz goes (may be ``gates``: in place).
        dc_prev_out: (B, hidden, H, W), state dtype: where dc_prev goes (may be ``dc``).
        dbias_acc: must be None (the kernels' fused bias sum; not read here): the loop sums
            dz itself.
        lengths, step: as the forward's. Past a sample's end the saved gates already make
            dz = 0 and dc_prev = dc; only its output gradient is dropped here (so that a
            non-finite one cannot leak through a 0 * inf).
        valid: instead of lengths and step, the forward's multiplier for this step; dh is
            then read as given (the time loop zeroes the padding of the whole output gradient
            once, rather than per step).

    Returns:
        (dz_out, dc_prev_out, the peephole gradient (3, hidden) in the state dtype or None).
    """
    if dh is not None and lengths is not None and valid is None:
        dh = torch.where(reference.step_valid(lengths, step, dh.dim(), torch.bool), dh, 0)
    done, dpeep = native_gates.gate_backward(gates, c_prev, c, peephole, dh, dh2, dc,
                                             dz_out, dc_prev_out)
    if done:
        return dz_out, dc_prev_out, dpeep
    if dh is None:
        dh, dh2 = dh2, None
    if dh2 is not None:
        dh = dh2.add_(dh)
    _, _, dpeep = reference.gate_backward_from_gates_ref(
        gates, c_prev, c, peephole, dh, dc, dz_out=dz_out, dc_prev_out=dc_prev_out
    )
    return dz_out, dc_prev_out, dpeep


def gate_launchers(backend: str) -> tuple[Callable, Callable]:
    """The gate update pair for a backend. The kernels are imported only here, on first use:
    importing the package must not need Triton.

    Args:
        backend: "triton" for the kernels' launchers; anything else gives the torch twins.

    Returns:
        (gate_forward, gate_backward), both with the launchers' calling convention.
    """
    if backend == "triton":
        from .kernels.gates import gate_backward, gate_forward

        return gate_forward, gate_backward
    return gate_forward_torch, gate_backward_torch
