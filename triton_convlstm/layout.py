"""Every memory-layout decision of the package, in one place.

Frames are channels-last (channels the fast axis: cuDNN bf16 convolutions ran ~2x faster so,
and oneDNN on CPU ran this layer's 2-d training step 1.4x faster than in NCHW, 74.9 vs 104.4
ms, B4 T8 C8 hid32 24x24, one thread), except 3-d frames on the CPU
(:func:`frames_channels_last`); a sequence is time-major, ``(T, B, C, *spatial)``, each frame
in that layout (:func:`empty_seq`). The loops,
the ops' fake kernels, the CUDA-graph cache's static buffers and the Triton launchers all
allocate through these helpers, so compiled graphs see the strides the real kernels produce and
no copy is made to change a layout twice.
"""

from __future__ import annotations

import torch
from torch import Tensor

# On CPU, 3-d frames stay channels-first: torch's CPU conv3d (slow_conv3d) takes contiguous
# inputs (a channels-last one is copied at every call), and the gate math on channel slices of
# few hidden channels runs several times slower per element than on contiguous gates. Measured
# (one thread, interleaved, layer / eager formulation): cpu-3d inference 0.78x -> 0.88x,
# training 1.04x -> 1.06x; 1-d lost a little the same way (inference 0.82x -> 0.76-0.81x,
# training 0.95-0.98x -> 0.92-0.94x), so 1-d stays channels-last.
CHANNELS_FIRST_ON_CPU = (3,)


def frames_channels_last(device: torch.device | str, spatial_dims: int) -> bool:
    """Whether frames of ``spatial_dims`` dims on ``device`` are kept channels-last.

    Args:
        device: the frames' device (a fake tensor's reports the real one; "meta" counts as a
            GPU's).
        spatial_dims: 1, 2 or 3.

    >>> frames_channels_last("cpu", 2), frames_channels_last("cpu", 3)
    (True, False)
    """
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return kind != "cpu" or spatial_dims not in CHANNELS_FIRST_ON_CPU


def conv_layout(t: Tensor) -> Tensor:
    """t (N, C, *spatial) (a frame batch or a weight) in the layout its frames are kept in on
    its device: :func:`channels_last`, or contiguous for 3-d on the CPU."""
    if frames_channels_last(t.device, t.dim() - 2):
        return channels_last(t)
    return t.contiguous()


def cat_channels(x: Tensor, h: Tensor) -> Tensor:
    """``torch.cat([x, h], dim=1)`` of frames (N, C, *spatial) of one dtype, in their device's
    layout (:func:`frames_channels_last`). torch.cat follows its inputs' strides, and a
    one-channel frame's say nothing of a layout: a contiguous one (a C=1 input) made the
    concatenation contiguous and oneDNN reorder every step's input to its channels-last weight
    (B1 C1+8 64x64: 354 against 179 us a convolution)."""
    if torch.is_grad_enabled() and (x.requires_grad or h.requires_grad):
        return torch.cat([x, h], dim=1)  # (an out= argument is not differentiable)
    n, c, *spatial = x.shape
    out = empty_seq(1, n, c + h.shape[1], *spatial, dtype=x.dtype, device=x.device)[0]
    return torch.cat([x, h], dim=1, out=out)


def _empty_channels_last(shape: tuple[int, ...], dtype: torch.dtype,
                         device: torch.device | str) -> Tensor:
    """(N, C, *spatial) with the channels as the fast axis, for any number of spatial dims
    (the permuted allocation is what channels_last and channels_last_3d are for 2 and 3)."""
    n, c, *spatial = shape
    return torch.empty((n, *spatial, c), dtype=dtype, device=device).movedim(-1, 1)


def _moved_strides(shape: tuple[int, ...], to: int) -> tuple[int, ...]:
    """The strides of ``torch.empty(shape without dim ``to``, then that dim last).movedim(-1,
    to)``, computed, not allocated (a meta allocation is ~5 us of host time, several a call):
    torch's contiguous strides, each the next one times the next size (at least 1)."""
    order = [*shape[:to], *shape[to + 1:], shape[to]]
    strides = [1] * len(order)
    for k in range(len(order) - 2, -1, -1):
        strides[k] = strides[k + 1] * max(order[k + 1], 1)
    last = strides.pop()
    strides.insert(to, last)
    return tuple(strides)


def channels_last(t: Tensor) -> Tensor:
    """t (N, C, *spatial) with channels as its fast axis: t itself when it already is, else one
    copy. Weights are laid out so for the convolutions, as the frames are."""
    if t.is_contiguous(memory_format=torch.channels_last) and t.dim() == 4:
        return t
    if t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d):
        return t
    if t.stride() == _moved_strides(tuple(t.shape), 1):
        return t
    return _empty_channels_last(tuple(t.shape), t.dtype, t.device).copy_(t)


def empty_like_layout(ref: Tensor, channels: int, dtype: torch.dtype | None = None,
                      shape: tuple[int, ...] | None = None) -> Tensor:
    """An empty tensor laid out like ``ref``, with another channel count (or shape) and dtype.

    Args:
        ref: (B, C, *spatial) with 1 to 3 spatial dims, any dtype and strides.
        channels: the new tensor's channel count.
        dtype: the new tensor's dtype (ref's if None).
        shape: the whole new shape instead (its dim 1 is the channels), e.g. a padded one.

    Returns:
        (B, channels, *spatial) on ref's device: channels as the fast axis when ref's are
        (stride 1, more than one channel), else contiguous.
    """
    shape = tuple(shape) if shape is not None else (ref.shape[0], channels, *ref.shape[2:])
    dtype = ref.dtype if dtype is None else dtype
    if ref.stride(1) == 1 and ref.shape[1] > 1:
        return _empty_channels_last(shape, dtype, ref.device)
    return torch.empty(shape, dtype=dtype, device=ref.device)


def empty_seq(t: int, b: int, ch: int, *spatial: int, dtype: torch.dtype,
              device: torch.device | str, layout_of: torch.device | str | None = None) -> Tensor:
    """An empty buffer in the sequence layout: time-major, each frame channels-last (but see
    :func:`frames_channels_last`).

    The fake kernels allocate through this too (on the meta device), so compiled graphs see the
    strides the real loops produce.

    Args:
        t, b, ch: steps, batch, channels.
        spatial: the frames' 1 to 3 sizes (L; H, W; D, H, W).
        dtype: the buffer's dtype.
        device: where to allocate (``"meta"`` for strides only).
        layout_of: the device whose layout to take (with ``device="meta"``); None: device's.

    Returns:
        (t, b, ch, *spatial), uninitialised; each ``[i]`` is a (b, ch, *spatial) frame batch
        in the frames' layout.

    >>> seq = empty_seq(2, 3, 4, 5, 6, dtype=torch.float32, device="cpu")
    >>> seq.shape, seq[0].is_contiguous(memory_format=torch.channels_last)
    (torch.Size([2, 3, 4, 5, 6]), True)
    """
    if not frames_channels_last(layout_of or device, len(spatial)):
        return torch.empty(t, b, ch, *spatial, dtype=dtype, device=device)
    return torch.empty(t, b, *spatial, ch, dtype=dtype, device=device).movedim(-1, 2)


def in_seq_layout(t: Tensor) -> bool:
    """Whether a tensor has exactly :func:`empty_seq`'s strides (then the loops read it as is).

    Args:
        t: (T, B, C, *spatial), any dtype.
    """
    shape = tuple(t.shape)
    to = 2 if frames_channels_last(t.device, len(shape) - 3) else len(shape) - 1
    return t.stride() == _moved_strides(shape, to)


def like_seq(t: Tensor) -> Tensor:
    """A copy of a sequence in the sequence layout: what the loops read without further copies.
    CUDA graphs keep their static inputs in it.

    Args:
        t: (T, B, C, *spatial), any dtype and strides.

    Returns:
        (T, B, C, *spatial) in t's dtype and on its device, with :func:`empty_seq`'s strides.
    """
    return empty_seq(*t.shape, dtype=t.dtype, device=t.device).copy_(t)


def seq_frames(x: Tensor) -> Tensor:
    """A sequence as one batch of frames in the sequence layout's frame layout.

    Args:
        x: (T, B, C, *spatial), any dtype and strides.

    Returns:
        (T*B, C, *spatial): a view when x already is in the sequence layout (a later layer's
        input), else one copy (not a reshape copy and then a layout copy).
    """
    return (x if in_seq_layout(x) else like_seq(x)).flatten(0, 1)


def frames_as_seq(frames: Tensor, t: int, b: int) -> Tensor:
    """Frames back as a time-major sequence (the inverse of :func:`seq_frames`).

    Args:
        frames: (T*B, ch, *spatial), any dtype.
        t, b: the steps and batch size the frames are split into.

    Returns:
        (T, B, ch, *spatial), a view; with exactly :func:`empty_seq`'s strides when the frames
        are channels-last (unflatten would give a size-1 batch axis another stride).
    """
    last = frames.movedim(1, -1)
    if last.is_contiguous():
        return last.view(t, b, *last.shape[1:]).movedim(-1, 2)
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
