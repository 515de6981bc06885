"""The common one-frame call on CPU, checked in a few comparisons: streaming.

A real-time user (nowcasting, a video model fed frame by frame) calls the cell, or the layer on
T=1 chunks, once per frame with the state carried. At small frames (hid16 16x16: a ~100 us
step) the full checks (validation.py, step_by_step.py, the backend and graph policies; ~25-90
us of Python) cost as much as the math. Here the call that needs none of their branches is
recognised by direct comparisons with what the full checks would accept, and computed by the
same ``cell_step``; anything else (another dtype or device, autocast, hooks, a replaced or
parametrized conv, reflect/circular padding, compile or export tracing, dropout, lengths,
bidirectional layers, gradients through the layer, a missing state) returns None, and the
caller runs the full path, errors included. Results are the full path's, bit for bit
(tests/lib/test_quick_step.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import graphs, validation
from .backend import exporting
from .reference import state_dtype
from .step_by_step import calls_cell, global_hooks, plain_conv
from .step_op import cell_step

_ZERO_PAD_MODES = ("zeros", "replicate")  # pad any frame size: no check to skip


def _untraced() -> bool:
    """No compile or export tracing, no autocast on the CPU, no global module hooks: what
    holds for a whole call, asked once."""
    return not (torch.compiler.is_compiling() or exporting() or global_hooks()
                or torch.is_autocast_enabled("cpu"))


def _ready(cell: nn.Module, x: Tensor) -> tuple[nn.Module, Tensor] | None:
    """(conv, weight) where the cell and its input need no more checks than the state's (and
    :func:`_untraced`'s): a CPU tensor of the weight's dtype and the cell's channels and dims,
    the plain conv with zeros or replicate padding; else None."""
    if type(x) is not Tensor or not x.is_cpu or cell.backend == "triton":
        return None
    conv = cell._modules.get("conv")
    if (conv is None or not plain_conv(conv, cell.dilation, cell.conv_padding, cell.conv_class)
            or conv.padding_mode not in _ZERO_PAD_MODES):  # (a replaced conv may have none)
        return None
    # A parametrized weight (computed when read) or one set as a plain tensor is not a
    # registered parameter: the full path reads those.
    w = conv._parameters.get("weight")
    shape = x.shape
    if (w is None or x.dtype != w.dtype or not w.is_cpu or len(shape) != cell.spatial_dims + 2
            or shape[1] != cell.input_dim or x.numel() == 0):
        return None
    return conv, w


def _step(cell: nn.Module, conv: nn.Module, w: Tensor, x: Tensor, h: Tensor | None,
          c: Tensor) -> tuple[Tensor, Tensor]:
    """The step as the full path computes it (h None: the zero state, x's taps alone)."""
    bias, peep = conv._parameters.get("bias"), cell._parameters.get("peephole")
    if (bias is not None and bias.dtype != w.dtype) or (
            peep is not None and peep.dtype != c.dtype):  # (c: the state dtype)
        w, bias, peep = validation.cast_params(w, bias, peep, w.dtype)
    h, c = cell_step(x, h, c, w, bias, peep, cell.dilation, "torch",
                     padding_mode=conv.padding_mode)
    # Contiguous, as the popular cell's (see the cell's forward).
    return h.contiguous(), c.contiguous()


def _state(cell: nn.Module, w: Tensor, x: Tensor, state) -> tuple[Tensor, Tensor] | None:
    """state as (h, c) where it is a pair the full checks would pass unchanged; else None."""
    if type(state) not in (tuple, list) or len(state) != 2:
        return None
    h, c = state
    if (type(h) is not Tensor or type(c) is not Tensor or h.dtype != w.dtype
            or c.dtype != state_dtype(w.dtype) or not (h.is_cpu and c.is_cpu)
            or h.shape != c.shape or h.shape[0] != x.shape[0]
            or h.shape[1] != cell.hidden_dim or h.shape[2:] != x.shape[2:]):
        return None
    return h, c


def quick_cell_step(cell: nn.Module, x: Tensor, state) -> tuple[Tensor, Tensor] | None:
    """``cell(x, state)`` for the common CPU call with the state given, or None where the
    full path must run.

    Args:
        cell: a ConvLSTMCellNd (its forward calls this first).
        x: the input_tensor as given.
        state: the cur_state as given.

    Returns:
        (h, c) as the cell's forward returns them, or None.
    """
    ready = _ready(cell, x) if _untraced() else None
    pair = None if ready is None else _state(cell, ready[1], x, state)
    if pair is None:
        return None
    return _step(cell, *ready, x, *pair)


def quick_layer_step(model: nn.Module, x: Tensor, hidden_state, lengths,
                     plain_forward) -> tuple[list[Tensor], list[list[Tensor]]] | None:
    """``model(x, hidden_state)`` for one frame (T=1) in inference on CPU, layer by layer as
    :func:`quick_cell_step`, or None where the full path must run.

    Args:
        model: a ConvLSTMNd (its forward calls this first).
        x, hidden_state, lengths: the forward's arguments as given. hidden_state None is the
            zero state where the model does not define its own (``_init_hidden``).
        plain_forward: ConvLSTMCellNd.forward: a cell with its own forward (or hooks) is
            called step by step on the full path.

    Returns:
        (layer_outputs, last_states) as the model's forward returns them, or None.
    """
    if (torch.is_grad_enabled() or lengths is not None or type(x) is not Tensor
            or model.bidirectional or (graphs.EMULATE_ON_CPU and model.cuda_graphs)
            or not _untraced()):
        return None  # (the emulated graph cache: tests replay T=1 captures on CPU)
    if x.dim() != model.spatial_dims + 3 or x.shape[1 if model.batch_first else 0] != 1:
        return None
    if model.training and any(x_rate or h_rate for x_rate, h_rate in model._dropout_rates()):
        return None
    cells = list(model._modules["cell_list"]._modules.values())
    if hidden_state is None:
        if model._own_initial_state():
            return None
        hidden_state = [None] * len(cells)
    elif type(hidden_state) not in (list, tuple) or len(hidden_state) != len(cells):
        return None
    if any(calls_cell(cell, plain_forward) for cell in cells):
        return None  # before any step: none is computed twice
    frame = x.select(1 if model.batch_first else 0, 0)
    outputs, last = [], []
    for cell, state in zip(cells, hidden_state):
        ready = _ready(cell, frame)
        if ready is None:
            return None
        w = ready[1]
        if state is None:
            b, _, *spatial = frame.shape
            pair = (None, torch.zeros(b, cell.hidden_dim, *spatial, dtype=state_dtype(w.dtype)))
        else:
            pair = _state(cell, w, frame, state)
            if pair is None:
                return None
        h, c = _step(cell, *ready, frame, *pair)
        outputs.append(h)
        last.append([h, c])
        frame = h
    if not model.return_all_layers:
        outputs, last = outputs[-1:], last[-1:]
    # (B, 1, hidden, ...) outputs whatever batch_first, as the full path (and the popular
    # module) returns them: their own memory, not h's.
    return [torch.stack((h,), 1) for h in outputs], last
