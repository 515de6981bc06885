"""When a layer runs its modules step by step, as the popular module does, and that loop.

The fast path computes from ``cell.conv.weight`` and never calls the cells or their
convolutions, so whatever works by being called is lost there: forward hooks and pre-hooks
(prune's mask, the hook-based ``spectral_norm`` and ``weight_norm``, user hooks, global ones),
backward hooks, a cell's own ``forward`` (a subclass's, or one set on the instance by a
wrapper), a convolution that is not the plain ``nn.Conv2d`` the layer built. Where any of these
is present the layer calls ``cell(input_tensor=x_t, cur_state=[h, c])`` for every step, which
calls ``cell.conv`` itself: the same results, hook calls and gradients as the popular module.

``torch.nn.utils.parametrize`` parametrizations (``parametrizations.spectral_norm``,
``weight_norm``, ``orthogonal``) are not hooks: ``conv.weight`` is computed when read, so they
stay on the fast path, which reads it once per call (as the popular module under
``parametrize.cached()``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .reference import step_valid


def has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks of its own."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def global_hooks() -> bool:
    """Whether module hooks registered for every module (``nn.modules.module.
    register_module_forward_hook`` and its kin) are in force."""
    m = nn.modules.module
    return any(getattr(m, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
        "_global_backward_pre_hooks"))


def plain_conv(conv: nn.Module, dilation: tuple[int, ...], padding,
               conv_class: type[nn.Module] = nn.Conv2d) -> bool:
    """Whether ``conv`` is the layer's own convolution as built: a ``conv_class`` (nn.Conv1d,
    2d or 3d, or its parametrized subclass) with no hooks, stride 1, one group, the cell's
    dilation and padding. Anything else is called as a module."""
    cls = type(conv)
    if cls is not conv_class and not (parametrize.is_parametrized(conv)
                                      and cls.__bases__ == (conv_class,)):
        return False
    if "forward" in vars(conv):  # replaced on the instance (a wrapper, accelerate's hooks)
        return False
    return (not has_hooks(conv) and set(conv.stride) == {1} and conv.groups == 1
            and tuple(conv.dilation) == tuple(dilation) and conv.padding == padding)


def calls_conv(cell: nn.Module) -> bool:
    """Whether a cell's step must call ``cell.conv`` as a module (global hooks would see the
    call, or the conv is not :func:`plain_conv`) rather than convolve with its weight."""
    return global_hooks() or not plain_conv(cell.conv, cell.dilation, cell.conv_padding,
                                            cell.conv_class)


def runs_modules(cell: nn.Module, fast_forward: Callable) -> bool:
    """Whether a layer must call ``cell`` step by step (see the module's docstring).

    Args:
        cell: a ConvLSTMCell (or subclass).
        fast_forward: ConvLSTMCell.forward, which the fast path computes the same as.
    """
    return calls_cell(cell, fast_forward) or calls_conv(cell)


def calls_cell(cell: nn.Module, fast_forward: Callable) -> bool:
    """Whether ``cell`` itself must be called as a module: hooks of its own, or a forward of
    its own (a subclass's, or one set on the instance). Arguments as :func:`runs_modules`'s."""
    own_forward = type(cell).forward is not fast_forward or "forward" in vars(cell)
    return has_hooks(cell) or own_forward


def layer_by_modules(cell: nn.Module, seq: Tensor, h0: Tensor | None, c0: Tensor | None,
                     lengths: Tensor | None = None,
                     recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One layer over the sequence by calling ``cell`` for every step, as the popular module
    does (keywords included, so hooks see the same call).

    Args:
        cell: the layer's cell.
        seq: (T, B, C, *spatial), the compute dtype.
        h0, c0: (B, hidden, *spatial), or None for the zero state (``cell.init_hidden``'s, as the
            popular module starts from).
        lengths, recurrent_mask: as :func:`triton_convlstm.sequence.layer_forward`'s: past a
            sample's end its cell is kept and its output zero; the mask multiplies the h the
            cell is handed (which only its convolution reads).

    Returns:
        (h_seq, c_last): (T, B, hidden, *spatial) and (B, hidden, *spatial).
    """
    t, b, _, *spatial = seq.shape
    h, c = (h0, c0) if h0 is not None else cell.init_hidden(b, tuple(spatial))
    hs = []
    for step in range(t):
        h_in = h if recurrent_mask is None else h * recurrent_mask
        h_new, c_new = cell(input_tensor=seq[step], cur_state=[h_in, c])
        h, c = keep_past_end(lengths, step, h_new, c_new, c)
        hs.append(h)
    return torch.stack(hs), c


def keep_past_end(lengths: Tensor | None, step: int, h: Tensor, c: Tensor,
                  c_prev: Tensor) -> tuple[Tensor, Tensor]:
    """A step's (h, c) where samples past their end (step >= lengths[b]) get h = 0 and keep
    c_prev, written with ``torch.where`` (for the loops that call modules or standard ops)."""
    if lengths is None:
        return h, c
    valid = step_valid(lengths, step, h.dim(), torch.bool)
    return torch.where(valid, h, 0), torch.where(valid, c, c_prev)
