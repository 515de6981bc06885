"""The benchmarks' baseline: the common ConvLSTM formulation, one "cat, conv, split" cell per
step, run eagerly (or under torch.compile), in 1, 2 or 3 spatial dims, and bidirectional as two
passes. Its state_dict loads into :class:`triton_convlstm.ConvLSTM` (``ConvLSTM1d``,
``ConvLSTM3d``) without peepholes, so both run the same weights."""

from __future__ import annotations

import torch
from torch import Tensor, nn

# The popular module's convolution for each number of spatial dims.
_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class EagerConvLSTM(nn.Module):
    """The common formulation (one cat-conv-split cell per step, eager), used as a baseline.

    Same parameters and state_dict as the package's layer of the same spatial dims without
    peepholes (``cell_list.{l}.conv``, plus ``cell_list_reverse.{l}.conv`` when bidirectional).
    x: (B, T, C, *spatial); returns the last layer's (B, T, hidden, *spatial) output (2*hidden
    when bidirectional) and (h, c).

    Args:
        input_dim: channels C of x.
        hidden_dim: hidden channels of every layer (of each direction).
        kernel_size: side of the cubic kernels, odd (padding kernel_size // 2 keeps the frame).
        num_layers: stacked layers.
        spatial_dims: 1 (nn.Conv1d, x (B, T, C, L)), 2 (nn.Conv2d, (B, T, C, H, W)) or 3
            (nn.Conv3d, (B, T, C, D, H, W)).
        bidirectional: each layer also runs a reverse stack's cell from t = T-1 down to 0, a
            second pass written as the first; the output at t concatenates the forward h after
            x[t] with the reverse h after x[t] (forward first), as the layer's does.

    Raises:
        ValueError: for spatial_dims other than 1, 2 or 3.
    """

    def __init__(self, input_dim: int, hidden_dim: int, kernel_size: int, num_layers: int, *,
                 spatial_dims: int = 2, bidirectional: bool = False) -> None:
        super().__init__()
        if spatial_dims not in _CONVS:
            raise ValueError(f"spatial_dims: expected 1, 2 or 3, got {spatial_dims}")
        self.hidden_dim = hidden_dim
        self.spatial_dims = spatial_dims
        self.bidirectional = bidirectional
        # A bidirectional layer's output (both directions) is the next layer's input.
        below = 2 * hidden_dim if bidirectional else hidden_dim

        def stack() -> nn.ModuleList:
            cells = nn.ModuleList()
            for layer in range(num_layers):
                cell = nn.Module()
                cell.conv = _CONVS[spatial_dims](
                    (input_dim if layer == 0 else below) + hidden_dim,
                    4 * hidden_dim,
                    kernel_size,
                    padding=kernel_size // 2,
                )
                cells.append(cell)
            return cells

        self.cell_list = stack()
        if bidirectional:
            self.cell_list_reverse = stack()

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Run all layers over the sequence from zero states.

        Args:
            x: (B, T, C, *spatial), C = input_dim, ``spatial_dims`` trailing dims.

        Returns:
            (out, (h, c)): the last layer's (B, T, hidden, *spatial) outputs and its final h
            and c, each (B, hidden, *spatial), all in x's dtype. Bidirectional: 2*hidden
            channels, forward first; the reverse direction's final state is the one after
            x[0].
        """
        b, t, _, *spatial = x.shape
        # The reverse pass is the forward one reading t = T-1 .. 0 with its own cells.
        directions = [(self.cell_list, range(t))]
        if self.bidirectional:
            directions.append((self.cell_list_reverse, range(t - 1, -1, -1)))
        seq = x
        for layer in range(len(self.cell_list)):
            passes = []
            # One loop, written inline as the 2-d baseline always was: the CPU memory gates and
            # committed results measure its peak, and a helper function would free the last
            # step's gates (z) earlier and so lower eager's peak.
            for cells, steps in directions:
                cell = cells[layer]
                h = x.new_zeros(b, self.hidden_dim, *spatial)
                c = torch.zeros_like(h)
                outs = []
                for step in steps:
                    z = cell.conv(torch.cat([seq[:, step], h], dim=1))
                    zi, zf, zo, zg = torch.split(z, self.hidden_dim, dim=1)
                    c = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
                    h = torch.sigmoid(zo) * torch.tanh(c)
                    outs.append(h)
                passes.append((outs, h, c))
            if self.bidirectional:
                (fwd, h_fwd, c_fwd), (back, h_back, c_back) = passes
                h, c = torch.cat([h_fwd, h_back], dim=1), torch.cat([c_fwd, c_back], dim=1)
                # back[k] read x[T-1-k]: reversed, entry t is the reverse h after x[t].
                outs = [torch.cat([f, r], dim=1) for f, r in zip(fwd, reversed(back))]
            seq = torch.stack(outs, dim=1)
        return seq, (h, c)


class EagerConvLSTMCell(nn.Module):
    """The popular module's cell, as its users call it one frame at a time: cat, conv, split,
    the gates, eager. Its state_dict (``conv.weight``, ``conv.bias``) loads into
    :class:`triton_convlstm.ConvLSTMCell`.

    Args:
        input_dim: channels of x.
        hidden_dim: channels of h and c.
        kernel_size: side of the square kernel, odd.
    """

    def __init__(self, input_dim: int, hidden_dim: int, kernel_size: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.conv = nn.Conv2d(input_dim + hidden_dim, 4 * hidden_dim, kernel_size,
                              padding=kernel_size // 2)

    def forward(self, input_tensor: Tensor,
                cur_state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """One step: x (B, C, H, W) and (h, c) (B, hidden, H, W) -> the new (h, c)."""
        h, c = cur_state
        z = self.conv(torch.cat([input_tensor, h], dim=1))
        zi, zf, zo, zg = torch.split(z, self.hidden_dim, dim=1)
        c = torch.sigmoid(zf) * c + torch.sigmoid(zi) * torch.tanh(zg)
        return torch.sigmoid(zo) * torch.tanh(c), c
