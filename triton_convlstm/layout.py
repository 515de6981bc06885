"""Every memory-layout decision of the package, in one place.

Frames are channels_last everywhere; a sequence is time-major, ``(T, B, C, H, W)``, each frame
channels_last (:func:`empty_seq`). The loops, the ops' fake kernels, the CUDA-graph cache's
static buffers and the Triton launchers all allocate through these helpers, so compiled graphs
see the strides the real kernels produce and no copy is made to change a layout twice.
"""

from __future__ import annotations

import torch
from torch import Tensor

# channels_last frames everywhere: cuDNN bf16 convolutions ran ~2x faster in it, and oneDNN on
# CPU ran this layer's training step 1.4x faster than in NCHW (74.9 vs 104.4 ms, B4 T8 C8 hid32
# 24x24, one thread).
MEMORY_FORMAT = torch.channels_last


def memory_format_of(t: Tensor) -> torch.memory_format:
    """The memory format to allocate a tensor that goes with ``t`` in.

    Args:
        t: (N, C, H, W), any dtype.

    Returns:
        ``torch.channels_last`` when t is laid out so and not also contiguous (a size-1 axis can
        make it both), else ``torch.contiguous_format``.
    """
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_like_layout(ref: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    """An empty tensor laid out like ``ref``, with another channel count and dtype.

    Args:
        ref: (B, C, H, W), any dtype and strides.
        channels: the new tensor's channel count.
        dtype: the new tensor's dtype.

    Returns:
        (B, channels, H, W) on ref's device: channels_last when ref's channels are its fast axis
        (stride 1, more than one channel), else contiguous.
    """
    b, _, hh, ww = ref.shape
    channels_last = ref.stride(1) == 1 and ref.shape[1] > 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((b, channels, hh, ww), dtype=dtype, device=ref.device, memory_format=fmt)


def empty_seq(t: int, b: int, ch: int, h: int, w: int, *, dtype: torch.dtype,
              device: torch.device | str) -> Tensor:
    """An empty buffer in the sequence layout: time-major, each frame channels_last.

    The fake kernels allocate through this too (on the meta device), so compiled graphs see the
    strides the real loops produce.

    Args:
        t, b, ch, h, w: steps, batch, channels, height and width.
        dtype: the buffer's dtype.
        device: where to allocate (``"meta"`` for strides only).

    Returns:
        (t, b, ch, h, w), uninitialised; each ``[i]`` is a channels_last (b, ch, h, w) frame batch.

    >>> seq = empty_seq(2, 3, 4, 5, 6, dtype=torch.float32, device="cpu")
    >>> seq.shape, seq[0].is_contiguous(memory_format=torch.channels_last)
    (torch.Size([2, 3, 4, 5, 6]), True)
    """
    return torch.empty(t, b, h, w, ch, dtype=dtype, device=device).permute(0, 1, 4, 2, 3)


def in_seq_layout(t: Tensor) -> bool:
    """Whether a tensor has exactly :func:`empty_seq`'s strides (then the loops read it as is).

    Args:
        t: (T, B, C, H, W), any dtype.
    """
    return t.stride() == empty_seq(*t.shape, dtype=t.dtype, device="meta").stride()


def like_seq(t: Tensor) -> Tensor:
    """A copy of a sequence in the sequence layout: what the loops read without further copies.
    CUDA graphs keep their static inputs in it.

    Args:
        t: (T, B, C, H, W), any dtype and strides.

    Returns:
        (T, B, C, H, W) in t's dtype and on its device, with :func:`empty_seq`'s strides.
    """
    return empty_seq(*t.shape, dtype=t.dtype, device=t.device).copy_(t)


def seq_frames(x: Tensor) -> Tensor:
    """A sequence as one batch of channels_last frames.

    Args:
        x: (T, B, C, H, W), any dtype and strides.

    Returns:
        (T*B, C, H, W) channels_last: a view when x already is in the sequence layout (a later
        layer's input), else one copy (not a reshape copy and then a layout copy).
    """
    return (x if in_seq_layout(x) else like_seq(x)).flatten(0, 1)


def frames_as_seq(frames: Tensor, t: int, b: int) -> Tensor:
    """Frames back as a time-major sequence (the inverse of :func:`seq_frames`).

    Args:
        frames: (T*B, ch, H, W), any dtype.
        t, b: the steps and batch size the frames are split into.

    Returns:
        (T, B, ch, H, W), a view; with exactly :func:`empty_seq`'s strides when the frames are
        channels_last (unflatten would give a size-1 batch axis another stride).
    """
    nhwc = frames.permute(0, 2, 3, 1)
    if nhwc.is_contiguous():
        return nhwc.view(t, b, *nhwc.shape[1:]).permute(0, 1, 4, 2, 3)
    return frames.unflatten(0, (t, b))


def in_layout_of(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with exactly the strides and dtype of ``torch.empty_like(like)``: what a custom
    op's fake kernel promised for an output made like ``like``.

    Args:
        t: a tensor of like's shape.
        like: the tensor the output was promised to be made like.

    Returns:
        t itself where its strides and dtype already match, else a copy made with
        ``torch.empty_like(like)``.
    """
    promised = torch.empty_like(like, device="meta").stride()  # strides without an allocation
    if promised == t.stride() and like.dtype == t.dtype:
        return t
    return torch.empty_like(like).copy_(t)
