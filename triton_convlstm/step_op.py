"""The single-step op: one ConvLSTM step's gate update as torch ops (Triton kernels behind
torch.library, or plain torch), and :func:`cell_step`, a whole step (convolution and update).

:func:`gate_update` is the entry point (:func:`cell_step`, and so ConvLSTMCell, calls it). On
the Triton path it calls two custom ops, ``triton_convlstm::gate_forward`` and
``triton_convlstm::gate_backward``, whose fake kernels let torch.compile trace them without
running them (fullgraph, no graph break) and whose registered autograd makes them
differentiable. The torch path is autograd through
:func:`triton_convlstm.reference.gate_forward_ref`, chosen in Python so CPU models compile too.

>>> z, c = torch.randn(2, 8, 5, 5), torch.zeros(2, 2, 5, 5)  # z: (B, 4*hidden, H, W)
>>> h, c = gate_update(z, c)  # bias and peephole optional
"""

# No `from __future__ import annotations`: torch.library infers the op schemas from the hints.
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import native_conv, native_frame, native_gates, reference
from .backend import check_backend_name, resolve_backend
from .conv import conv_same
from .layout import channels_last, frames_channels_last
from .layout import empty_like_layout as _new
from .validation import float_tensor

__all__ = ["gate_update", "gate_forward_op", "gate_backward_op", "cell_step"]


def _peephole_grad_buffer(z: Tensor, peephole: Tensor | None) -> Tensor:
    # Custom ops cannot return None; an empty tensor stands for "no peepholes".
    shape = (0,) if peephole is None else (3, z.shape[1] // 4)
    return torch.empty(shape, dtype=torch.float32, device=z.device)


@torch.library.custom_op("triton_convlstm::gate_forward", mutates_args=())
def gate_forward_op(
    zx: Tensor, zh: Tensor | None, bias: Tensor | None, c_prev: Tensor,
    peephole: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The gate update on the Triton kernel (:func:`triton_convlstm.kernels.gates.gate_forward`).

    Args:
        zx: (B, 4*hidden, *spatial) fp32/bf16/fp16, pre-activations in gate order i, f, o, g.
        zh: (B, 4*hidden, *spatial) fp32/bf16/fp16, added to zx, or None.
        bias: (4*hidden,) fp32/bf16/fp16 or None.
        c_prev: (B, hidden, *spatial) fp32.
        peephole: (3, hidden) fp32/bf16/fp16 or None.

    Returns:
        (h, c, z): h (B, hidden, *spatial) in zx's dtype, c (B, hidden, *spatial) fp32 and the
        summed pre-activation z (B, 4*hidden, *spatial) in zx's dtype (saved for backward).
    """
    from .kernels.gates import gate_forward  # lazy: importing ops must not need Triton

    hid = zx.shape[1] // 4
    h, c, z = _new(zx, hid, zx.dtype), _new(zx, hid, torch.float32), _new(zx, 4 * hid, zx.dtype)
    gate_forward(zx, zh, bias, c_prev, peephole, h_out=h, c_out=c, z_out=z)
    return h, c, z


@gate_forward_op.register_fake
def _(zx, zh, bias, c_prev, peephole):
    hid = zx.shape[1] // 4
    return _new(zx, hid, zx.dtype), _new(zx, hid, torch.float32), _new(zx, 4 * hid, zx.dtype)


@torch.library.custom_op("triton_convlstm::gate_backward", mutates_args=())
def gate_backward_op(
    z: Tensor, c_prev: Tensor, c: Tensor, peephole: Tensor | None, dh: Tensor | None,
    dc: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of :func:`gate_forward_op` from its saved z.

    Args:
        z: (B, 4*hidden, *spatial) fp32/bf16/fp16, the pre-activations the forward saved.
        c_prev: (B, hidden, *spatial) fp32, the forward's previous cell.
        c: (B, hidden, *spatial) fp32, the cell the forward returned.
        peephole: (3, hidden) fp32/bf16/fp16 or None, as in the forward.
        dh: (B, hidden, *spatial) fp32/bf16/fp16, the gradient w.r.t. h, or None (zero).
        dc: (B, hidden, *spatial) fp32/bf16/fp16, the gradient w.r.t. c, or None (zero).

    Returns:
        (dz, dc_prev, dpeephole): dz (B, 4*hidden, *spatial) in z's dtype, dc_prev (B,
        hidden, *spatial) fp32 and dpeephole (3, hidden) fp32, or empty without peepholes.
    """
    from .kernels.gates import gate_backward

    dz, dc_prev = _new(z, z.shape[1], z.dtype), _new(z, z.shape[1] // 4, torch.float32)
    _, _, dpe = gate_backward(z, c_prev, c, peephole, dh, None, dc, dz_out=dz,
                               dc_prev_out=dc_prev)  # fmt: skip
    return dz, dc_prev, (_peephole_grad_buffer(z, None) if dpe is None else dpe)


@gate_backward_op.register_fake
def _(z, c_prev, c, peephole, dh, dc):
    return (_new(z, z.shape[1], z.dtype), _new(z, z.shape[1] // 4, torch.float32),
            _peephole_grad_buffer(z, peephole))  # fmt: skip


def _setup_context(ctx, inputs, output):
    zx, zh, bias, c_prev, peephole = inputs
    _, c, z = output
    # z is only kept for the backward: no gradient flows into it, and none is materialised.
    ctx.mark_non_differentiable(z)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, c_prev, c, peephole)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in inputs)


def _bias_grad(dz, dtype):
    # fp32 accumulation for 16-bit dz
    return dz.sum((0, *range(2, dz.dim())), dtype=torch.float32).to(dtype)


def _backward(ctx, dh, dc, _dz):
    z, c_prev, c, peephole = ctx.saved_tensors
    dz, dc_prev, dpe = gate_backward_op(z, c_prev, c, peephole, dh, dc)
    need = ctx.needs_input_grad
    zx_t, zh_t, bias_t, cp_t, pe_t = ctx.dtypes
    return (
        dz.to(zx_t) if need[0] else None,
        dz.to(zh_t) if zh_t is not None and need[1] else None,
        _bias_grad(dz, bias_t) if bias_t is not None and need[2] else None,
        dc_prev.to(cp_t) if need[3] else None,
        dpe.to(pe_t) if pe_t is not None and need[4] else None,
    )


gate_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_args(zx, c_prev, zh, bias, peephole):
    """Shapes, floating dtypes and one device, checked here: a meta tensor among the
    arguments would route the op to its fake kernel (uninitialised outputs), and an integer
    one would truncate the torch path's results."""
    if not isinstance(zx, Tensor) or zx.dim() not in (3, 4, 5) or zx.shape[1] % 4:
        got = tuple(zx.shape) if isinstance(zx, Tensor) else type(zx).__name__
        raise ValueError(f"zx: expected a (B, 4*hidden, *spatial) tensor with 1 to 3 spatial "
                         f"dims, got {got}")
    b, c4, *spatial = zx.shape
    hid = c4 // 4
    for name, t, shape in [("zx", zx, (b, c4, *spatial)), ("c_prev", c_prev, (b, hid, *spatial)),
                           ("zh", zh, (b, c4, *spatial)), ("bias", bias, (c4,)),
                           ("peephole", peephole, (3, hid))]:  # fmt: skip
        if name in ("zx", "c_prev") or t is not None:
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected shape {shape}, got {got}")
            float_tensor(name, t)
            if t.device != zx.device:
                raise ValueError(f"{name}: expected a tensor on {zx.device} (zx's device), "
                                 f"got {t.device}")


def _torch_gate_update(zx, c_prev, zh, bias, peephole):
    """The torch path: autograd (and dynamo) straight through reference.gate_forward_ref."""
    z = reference.preactivation_ref(zx, zh, bias)
    h, c = reference.gate_forward_ref(z, c_prev.to(z.dtype), peephole)
    return h.to(zx.dtype), c


def gate_update(
    zx: Tensor, c_prev: Tensor, *, zh: Tensor | None = None, bias: Tensor | None = None,
    peephole: Tensor | None = None, backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One ConvLSTM gate/state update: z = zx + zh + bias, then the gates and the new state.

    Differentiable w.r.t. zx, zh, c_prev, bias and peephole.

    Args:
        zx: (B, 4*hidden, *spatial), floating, pre-activations in gate order i, f, o, g.
        c_prev: (B, hidden, *spatial), floating (fp32 on the Triton path: others are cast).
        zh: (B, 4*hidden, *spatial), floating, pre-activations added to zx, or None.
        bias: (4*hidden,), floating, or None.
        peephole: (3, hidden), floating, or None.
        backend: "auto" (Triton on CUDA, else torch), "torch" or "triton".

    Returns:
        (h, c): h (B, hidden, *spatial) in zx's dtype and c (B, hidden, *spatial) in fp32
        (fp64 for fp64 inputs, which always take the torch path).

    Raises:
        TypeError, ValueError: naming the argument of the wrong type, dtype, shape or device.
        RuntimeError: backend="triton" where it cannot run.

    >>> h, c = gate_update(torch.randn(2, 8, 5, 5), torch.zeros(2, 2, 5, 5), backend="torch")
    """
    _check_args(zx, c_prev, zh, bias, peephole)
    check_backend_name(backend)
    if resolve_backend(backend, zx.device, zx.dtype) == "torch":
        return _torch_gate_update(zx, c_prev, zh, bias, peephole)
    if c_prev.dtype != torch.float32:  # the kernels keep the state in fp32
        c_prev = c_prev.float()
    h, c, _ = gate_forward_op(zx, zh, bias, c_prev, peephole)
    return h, c


# On CPU, frames of at least this many pixels are convolved channels-last, as the time loop's
# (oneDNN; one frame, one thread, hid64 64x64: the layer's step 12.9 -> 11.4 ms, the popular
# cell's 12.9); smaller ones stay in the caller's layout (at 16x16 the conversions cost ~80 us
# and the convolution gains nothing).
CHANNELS_LAST_PIXELS = 1024


def cell_step(x_t: Tensor, h: Tensor | None, c: Tensor, weight: Tensor, bias: Tensor | None,
              peephole: Tensor | None, dilation: Sequence[int], backend: str = "torch", *,
              padding_mode: str = "zeros") -> tuple[Tensor, Tensor]:
    """One step, as the popular module's cell: the convolution of [x_t, h] with the combined
    weight (of x_t alone when h is None, the zero state: only the input part contributes), then
    :func:`gate_update`.

    Args:
        x_t: (B, C, H, W), the compute dtype.
        h: (B, hidden, *spatial), the compute dtype, or None (zeros).
        c: (B, hidden, *spatial), the state dtype.
        weight: (4*hidden, C + hidden, kh, kw), the compute dtype.
        bias: (4*hidden,), the compute dtype, or None.
        peephole: (3, hidden), the state dtype, or None.
        dilation: (dh, dw).
        backend: as :func:`gate_update`'s.
        padding_mode: the convolution's, as nn.Conv2d's.

    Returns:
        (h, c): (B, hidden, *spatial) each, h in the compute dtype, c in the state dtype.
    """
    # The cell has checked its arguments: no second round of gate_update's checks. The torch
    # path adds the bias inside the convolution (free in oneDNN), as the popular cell does.
    on_torch = backend == "torch" or resolve_backend(backend, x_t.device, x_t.dtype) == "torch"
    conv_bias = bias if on_torch else None
    # A zero h pads to zeros in every mode: its taps contribute nothing.
    w = weight if h is not None else weight[:, : x_t.shape[1]]
    # Small frames in inference: the whole step in one C call (before anything else: the
    # streaming step's hot path).
    if on_torch and padding_mode == "zeros":
        done = native_frame.step_forward(x_t, h, c, w, conv_bias, peephole, dilation)
        if done is not None:
            return done
    last = (x_t.is_cpu and math.prod(x_t.shape[2:]) >= CHANNELS_LAST_PIXELS
            and frames_channels_last(x_t.device, x_t.dim() - 2))
    z = None
    if on_torch and padding_mode == "zeros":  # small 1-d and 3-d frames: C columns, a product
        z = native_conv.conv_small(x_t, h, w, conv_bias, dilation, last)
    if z is None:
        frame = x_t if h is None else torch.cat([x_t, h], dim=1)
        if last:
            frame, w = channels_last(frame), channels_last(w)
        z = conv_same(frame, w, dilation, conv_bias, padding_mode=padding_mode)
    if on_torch:  # the C kernel in inference where it serves the call, else torch ops
        return native_gates.gate_forward_new(z, c, peephole) or reference.gate_forward_ref(
            z, c, peephole)
    h, c, _ = gate_forward_op(z, None, bias, c if c.dtype == torch.float32 else c.float(),
                              peephole)
    return h, c
