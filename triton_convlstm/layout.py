"""Allocation in a reference tensor's memory format, shared by the launchers and the ops' real
and fake kernels (so compiled graphs see the strides the real kernels produce)."""

from __future__ import annotations

import torch
from torch import Tensor


def empty_like_layout(ref: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    """An empty (B, channels, H, W) tensor for ref (B, C, H, W): channels_last when ref's
    channels are its fast axis, else contiguous."""
    b, _, hh, ww = ref.shape
    channels_last = ref.stride(1) == 1 and ref.shape[1] > 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((b, channels, hh, ww), dtype=dtype, device=ref.device, memory_format=fmt)
