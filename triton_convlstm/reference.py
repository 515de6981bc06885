"""The ConvLSTM gate/state math in plain torch.

This is the one place the equations are written for the package: the CPU path runs it, the
Triton kernels are checked against it, and the benchmarks use :class:`EagerConvLSTM` (the common
"cat, conv, split" formulation) as their baseline. The tests keep their own float64 oracle so that
a mistake here cannot hide a mistake in the kernels.

Gate order along the channel axis of the pre-activations ``z`` is i, f, o, g (as in the popular
ConvLSTM). With peepholes ``p`` of shape (3, hidden) (Shi et al. 2015, eq. 3)::

    i = σ(z_i + p_0∘c_prev)      f = σ(z_f + p_1∘c_prev)      g = tanh(z_g)
    c = f∘c_prev + i∘g
    o = σ(z_o + p_2∘c)                                         # the NEW cell
    h = o∘tanh(c)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the cell state is kept in for inputs of ``dtype``: float64 stays, all else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _peephole_terms(peephole: Tensor | None, dtype: torch.dtype):
    if peephole is None:
        return None
    return peephole.to(dtype)[:, None, :, None, None]  # (3, 1, hidden, 1, 1)


def gate_forward(
    z: Tensor, c_prev: Tensor, peephole: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One gate/state update.

    z: (B, 4*hidden, H, W) pre-activations, bias included, any float dtype.
    c_prev: (B, hidden, H, W) cell state in ``state_dtype(z.dtype)``.
    peephole: (3, hidden) or None.
    Returns h (B, hidden, H, W) in z's dtype and c in the state dtype.
    """
    math = state_dtype(z.dtype)
    zi, zf, zo, zg = z.to(math).chunk(4, dim=1)
    c_prev = c_prev.to(math)
    p = _peephole_terms(peephole, math)
    if p is not None:
        zi = zi + p[0] * c_prev
        zf = zf + p[1] * c_prev
    i, f, g = torch.sigmoid(zi), torch.sigmoid(zf), torch.tanh(zg)
    c = f * c_prev + i * g
    if p is not None:
        zo = zo + p[2] * c
    h = torch.sigmoid(zo) * torch.tanh(c)
    return h.to(z.dtype), c


def gate_backward(
    z: Tensor,
    c_prev: Tensor,
    c: Tensor,
    peephole: Tensor | None,
    dh: Tensor | None,
    dc: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`gate_forward`, recomputing the gates from the saved ``z`` and cells.

    dh: (B, hidden, H, W) gradient w.r.t. h (or None), dc: gradient w.r.t. c (or None).
    Returns dz (z's dtype, (B, 4*hidden, H, W)), dc_prev (state dtype) and the peephole gradient
    (3, hidden) in the state dtype (None without peepholes).
    """
    math = state_dtype(z.dtype)
    zi, zf, zo, zg = z.to(math).chunk(4, dim=1)
    c_prev, c = c_prev.to(math), c.to(math)
    p = _peephole_terms(peephole, math)
    if p is not None:
        zi = zi + p[0] * c_prev
        zf = zf + p[1] * c_prev
        zo = zo + p[2] * c
    i, f, o, g = torch.sigmoid(zi), torch.sigmoid(zf), torch.sigmoid(zo), torch.tanh(zg)
    tc = torch.tanh(c)
    dh = torch.zeros_like(c) if dh is None else dh.to(math)
    dc = torch.zeros_like(c) if dc is None else dc.to(math)

    dzo = dh * tc * o * (1 - o)
    dc = dc + dh * o * (1 - tc * tc)
    if p is not None:
        dc = dc + dzo * p[2]
    dzi = dc * g * i * (1 - i)
    dzf = dc * c_prev * f * (1 - f)
    dzg = dc * i * (1 - g * g)
    dc_prev = dc * f
    dpeep = None
    if p is not None:
        dc_prev = dc_prev + dzi * p[0] + dzf * p[1]
        dpeep = torch.stack(
            [(dzi * c_prev).sum((0, 2, 3)), (dzf * c_prev).sum((0, 2, 3)), (dzo * c).sum((0, 2, 3))]
        )
    dz = torch.cat([dzi, dzf, dzo, dzg], dim=1).to(z.dtype)
    return dz, dc_prev, dpeep


class EagerConvLSTM(nn.Module):
    """The common formulation (one cat-conv-split cell per step, eager), used as a baseline.

    Same parameters and state_dict as :class:`triton_convlstm.ConvLSTM` without peepholes.
    x: (B, T, C, H, W); returns the last layer's (B, T, hidden, H, W) output and (h, c).
    """

    def __init__(self, input_dim: int, hidden_dim: int, kernel_size: int, num_layers: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.cell_list = nn.ModuleList()
        for layer in range(num_layers):
            cell = nn.Module()
            cell.conv = nn.Conv2d(
                (input_dim if layer == 0 else hidden_dim) + hidden_dim,
                4 * hidden_dim,
                kernel_size,
                padding=kernel_size // 2,
            )
            self.cell_list.append(cell)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        b, t, _, hh, ww = x.shape
        seq = x
        for cell in self.cell_list:
            h = x.new_zeros(b, self.hidden_dim, hh, ww)
            c = torch.zeros_like(h)
            outs = []
            for step in range(t):
                z = cell.conv(torch.cat([seq[:, step], h], dim=1))
                zi, zf, zo, zg = torch.split(z, self.hidden_dim, dim=1)
                c = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
                h = torch.sigmoid(zo) * torch.tanh(c)
                outs.append(h)
            seq = torch.stack(outs, dim=1)
        return seq, (h, c)
