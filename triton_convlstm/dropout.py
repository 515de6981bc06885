"""Variational dropout's masks (Gal & Ghahramani 2016, as Keras' ConvLSTM layers use it).

One mask per sample, drawn once per call and reused at every step: on a layer's input x, and
on the h that feeds the recurrent convolution (the h a layer returns is not masked). The masks
are ordinary tensors drawn from torch's generator before the time loop runs, then passed to it
as inputs: ``torch.manual_seed`` reproduces them, and a captured CUDA graph replays with the
masks of its call (its static copy of them is refreshed like any other input), never with
masks frozen at capture time.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def dropout_mask(p: float, like: Tensor, channels: int) -> Tensor | None:
    """A fresh mask for dropout rate ``p`` over (B, channels, *spatial) frames.

    Args:
        p: the drop probability, in [0, 1].
        like: a (T, B, C, *spatial) sequence: B, the spatial sizes, dtype and device are read.
        channels: the mask's channels.

    Returns:
        (B, channels, *spatial) in like's dtype: Bernoulli(1 - p) scaled by 1 / (1 - p) (so the
        expectation is kept), zeros for p == 1; None for p == 0 (nothing to draw).

    >>> m = dropout_mask(0.5, torch.zeros(3, 2, 1, 4, 4), channels=5)
    >>> m.shape, sorted(set(m.flatten().tolist())) in ([0.0, 2.0], [0.0], [2.0])
    (torch.Size([2, 5, 4, 4]), True)
    """
    if p == 0:
        return None
    _, b, _, *spatial = like.shape
    mask = torch.empty((b, channels, *spatial), dtype=like.dtype, device=like.device)
    if p == 1:
        return mask.zero_()
    return mask.bernoulli_(1 - p).div_(1 - p)


def rates(name: str, value, num_layers: int) -> list[float]:
    """A dropout rate for every layer, from one number or a list with one per layer.

    Args:
        name: the argument's name ("dropout", "recurrent_dropout"), for the error.
        value: a number in [0, 1], or a list (or tuple) of num_layers of them.
        num_layers: how many layers.

    Returns:
        num_layers floats.

    Raises:
        TypeError: not a number (bools included) or a list of them. ValueError: a list of
        another length, or a rate outside [0, 1] (NaN too).

    >>> rates("dropout", [0.5, 0], 2), rates("recurrent_dropout", 0.25, 3)
    ([0.5, 0.0], [0.25, 0.25, 0.25])
    """
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_layers
    if isinstance(value, (list, tuple)) and len(values) != num_layers:
        raise ValueError(f"{name}: expected one rate or a list of num_layers={num_layers} "
                         f"rates, got a list of {len(values)}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name}: expected a number in [0, 1] or a list of them, got {v!r}")
        if not 0 <= v <= 1:  # NaN fails this too
            raise ValueError(f"{name}: expected a rate in [0, 1], got {v}")
        out.append(float(v))
    return out
