"""For exporters only: the time loop written out step by step in standard torch ops.

While an exporter captures a model (:func:`triton_convlstm.backend.exporting`), each layer is
the popular module's loop instead of the package's one op per layer: per step one convolution
of [x_t, h_{t-1}] and the gate math on the torch path (:func:`triton_convlstm.step_op.cell_step`).
The same function as the fast path (same parameters, same state dtypes), in ops every runtime
knows; not fast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .reference import state_dtype
from .step_by_step import keep_past_end
from .step_op import cell_step


def layer_unrolled(x: Tensor, weight: Tensor, bias: Tensor | None, peephole: Tensor | None,
                   h0: Tensor | None, c0: Tensor | None, dilation: Sequence[int],
                   padding_mode: str = "zeros", lengths: Tensor | None = None,
                   recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One layer over the sequence, step by step.

    Args:
        x, weight, bias, peephole, h0, c0, dilation, padding_mode, lengths, recurrent_mask: as
            :func:`triton_convlstm.layer_op.layer_forward_op`'s (x (T, B, C, H, W); h0, c0
            None for zeros).

    Returns:
        (h_seq, c_last): (T, B, hidden, H, W) in the compute dtype and (B, hidden, H, W) in the
        state dtype.
    """
    t, b, _, *spatial = x.shape
    hid = weight.shape[0] // 4
    h = h0
    c = c0 if c0 is not None else x.new_zeros((b, hid, *spatial), dtype=state_dtype(x.dtype))
    hs = []
    for step in range(t):
        h_in = h if h is None or recurrent_mask is None else h * recurrent_mask
        h_new, c_new = cell_step(x[step], h_in, c, weight, bias, peephole, dilation,
                                 padding_mode=padding_mode)
        h, c = keep_past_end(lengths, step, h_new, c_new, c)
        hs.append(h)
    return torch.stack(hs), c
