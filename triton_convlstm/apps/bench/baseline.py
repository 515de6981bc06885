"""The benchmarks' baseline: the common ConvLSTM formulation, one "cat, conv, split" cell per
step, run eagerly (or under torch.compile). Its state_dict loads into
:class:`triton_convlstm.ConvLSTM` without peepholes, so both run the same weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EagerConvLSTM(nn.Module):
    """The common formulation (one cat-conv-split cell per step, eager), used as a baseline.

    Same parameters and state_dict as :class:`triton_convlstm.ConvLSTM` without peepholes.
    x: (B, T, C, H, W); returns the last layer's (B, T, hidden, H, W) output and (h, c).

    Args:
        input_dim: channels C of x.
        hidden_dim: hidden channels of every layer.
        kernel_size: side of the square kernels, odd (padding kernel_size // 2 keeps H, W).
        num_layers: stacked layers.
    """

    def __init__(self, input_dim: int, hidden_dim: int, kernel_size: int,
                 num_layers: int) -> None:
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
        """Run all layers over the sequence from zero states.

        Args:
            x: (B, T, C, H, W), C = input_dim.

        Returns:
            (out, (h, c)): the last layer's (B, T, hidden, H, W) outputs and its final h and c,
            each (B, hidden, H, W), all in x's dtype.
        """
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
