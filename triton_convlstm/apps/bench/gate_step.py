"""One CPU gate update, forward then backward, as the time loops make it: through the launchers
(the C kernels of :mod:`triton_convlstm.native_gates`) or as the torch ops of
:mod:`triton_convlstm.reference` alone. What the perf suite compares them on."""

from __future__ import annotations

from collections.abc import Callable

import torch

GATE_STEP_IMPLS = ("native", "torch-ops")


def build_gate_step(impl: str, batch: int, hidden: int, side: int,
                    seed: int = 0) -> Callable[[], None]:
    """A closure running one training step's gate update on channels-last (B, 4*hidden, side,
    side) pre-activations: the forward saving the activated gates, then the backward writing
    dz over them (from an output gradient, the recurrent one and the cell's), fp32.

    Args:
        impl: "native" (gate_launchers' torch-backend pair, which runs the C kernels where they
            are built) or "torch-ops" (reference.gate_forward_inplace_ref and
            gate_backward_from_gates_ref).
        batch, hidden, side: B, hidden channels, the square frame's side.
        seed: seeds the inputs.

    Returns:
        The step, a function of no arguments.

    Raises:
        ValueError: for an unknown impl.
    """
    from ... import reference
    from ...gate_launchers import gate_backward_torch, gate_forward_torch

    if impl not in GATE_STEP_IMPLS:
        raise ValueError(f"impl: expected one of {GATE_STEP_IMPLS}, got {impl!r}")
    g = torch.Generator().manual_seed(seed)
    cl = torch.channels_last

    def noise(channels):
        return torch.randn(batch, channels, side, side, generator=g).contiguous(memory_format=cl)

    zx, c_prev, dh, dh2, dc0 = (noise(4 * hidden), noise(hidden), noise(hidden), noise(hidden),
                                noise(hidden))
    gates, h, c, dc = (torch.empty_like(t) for t in (zx, c_prev, c_prev, dc0))

    def native():
        gate_forward_torch(zx, None, None, c_prev, None, h_out=h, c_out=c, z_out=gates,
                           save_z=True)
        dc.copy_(dc0)
        gate_backward_torch(gates, c_prev, c, None, dh, dh2.clone(), dc, dz_out=gates,
                            dc_prev_out=dc)

    def torch_ops():
        reference.gate_forward_inplace_ref(gates, c_prev, None, h_out=h, c_out=c, pre=zx)
        dc.copy_(dc0)
        reference.gate_backward_from_gates_ref(gates, c_prev, c, None, dh2.clone().add_(dh),
                                               dc, dz_out=gates, dc_prev_out=dc)

    return native if impl == "native" else torch_ops
