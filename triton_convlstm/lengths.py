"""Variable-length batches: the checks on ``lengths``, and the per-sample time indexing around
the time loop (the gate update itself masks the steps past each sample's end, on the device).

Sample b reads steps 0..lengths[b]-1. Past its end the gate update keeps its cell and writes a
zero output, so the final cell is the one after its last step, its padded outputs are zeros
(as ``pad_packed_sequence`` pads) and no gradient reaches its padded inputs. Its final h is
read from its last valid step (:func:`last_step`); a reverse direction starts at its last
valid step (:func:`reverse_time`), as ``nn.LSTM`` does with packed sequences.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .reference import step_valid


def check_lengths(lengths, batch: int, steps: int, device: torch.device) -> Tensor | None:
    """``lengths`` as the time loop takes it, checked.

    The range check reads the values on the host: free for a list or a CPU tensor, one
    synchronisation for a CUDA tensor. It is skipped while torch.compile traces (a host read
    would break the graph; there, values outside 1..T are clamped into it, so no access ever
    leaves the sequence) and while a CUDA graph is being captured.

    Args:
        lengths: None, or B integers: a list or tuple of ints, or an integer tensor (B,) on
            any device.
        batch, steps: B and T of the sequence.
        device: where the sequence is.

    Returns:
        None (also where every length is T, which is no masking at all), or a (B,) int64
        tensor on ``device``.

    Raises:
        TypeError: not integers. ValueError: not B of them, or one outside 1..T.
    """
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        bad = [v for v in lengths if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
        if bad:
            raise TypeError(f"lengths: expected ints, got {bad[0]!r}")
        # On the CPU whatever the default device (torch.device("meta") as a context, say).
        lengths = torch.tensor([int(v) for v in lengths], dtype=torch.int64,
                               device="cpu").reshape(len(lengths))
    if not isinstance(lengths, Tensor):
        raise TypeError("lengths: expected a 1-d integer tensor or a list of ints, got "
                        f"{type(lengths).__name__}")
    if lengths.dtype == torch.bool or lengths.is_floating_point() or lengths.is_complex():
        raise TypeError(f"lengths: expected an integer dtype, got {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},), one per sample, got "
                         f"{tuple(lengths.shape)}")
    if torch.compiler.is_compiling():
        return lengths.to(device=device, dtype=torch.int64).clamp(1, max(steps, 1))
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if capturing and lengths.device != torch.device(device):
        raise ValueError(f"lengths: expected a tensor on {device} while a CUDA graph is being "
                         f"captured (a copy from {lengths.device} cannot be captured)")
    if batch and not capturing:
        low, high = torch.stack([lengths.min(), lengths.max()]).tolist()
        if low < 1 or high > steps:
            raise ValueError(f"lengths: expected values in 1..{steps} (the sequence's T), got "
                             f"values from {low} to {high}")
        if low == steps:
            return None
    # Host to device without blocking (a blocking copy waits for the stream's queued work); any
    # other direction blocks, so that the host never reads a copy still in flight.
    to_device = lengths.device.type == "cpu" and torch.device(device).type != "cpu"
    return lengths.to(device=device, dtype=torch.int64, non_blocking=to_device)


def zero_padding(seq: Tensor, lengths: Tensor | None) -> Tensor:
    """A time-major (T, B, ...) sequence with each sample's steps past its end zeroed (one
    pass, for the first layer's input): padding is never read, so NaN or inf there cannot
    reach a result or a gradient (the steps past the end are computed, then masked)."""
    if lengths is None:
        return seq
    steps = torch.arange(seq.shape[0], device=lengths.device).unsqueeze(1)
    return torch.where(step_valid(lengths, steps, seq.dim(), torch.bool), seq, 0)


def reverse_index(lengths: Tensor, steps: int) -> Tensor:
    """(T, B) time indices that reverse each sample's valid prefix and leave its padding:
    t -> lengths[b]-1-t for t < lengths[b], else t. Its own inverse."""
    t = torch.arange(steps, device=lengths.device).unsqueeze(1)
    return torch.where(t < lengths, lengths - 1 - t, t)


def reverse_time(seq: Tensor, lengths: Tensor | None) -> Tensor:
    """A time-major (T, B, ...) sequence with each sample's valid steps in reverse order (the
    whole sequence flipped without lengths); applied twice it gives ``seq`` back."""
    if lengths is None:
        return seq.flip(0)
    index = reverse_index(lengths, seq.shape[0])
    return seq[index, torch.arange(seq.shape[1], device=seq.device)]


def last_step(h_seq: Tensor, lengths: Tensor | None) -> Tensor:
    """Each sample's h after its last valid step: (B, ...) from a time-major (T, B, ...)."""
    if lengths is None:
        return h_seq[-1]
    return h_seq[lengths - 1, torch.arange(h_seq.shape[1], device=h_seq.device)]


def unpack(x: PackedSequence, batch_first: bool) -> tuple[Tensor, Tensor]:
    """A PackedSequence as (padded sequence, lengths), in the original batch order."""
    return pad_packed_sequence(x, batch_first=batch_first)


def pack_like(outputs: Tensor, lengths: Tensor, like: PackedSequence) -> PackedSequence:
    """Batch-first (B, T, ...) outputs packed as ``like`` is (same batch_sizes, same sorted
    and unsorted indices), as nn.LSTM returns its output for a packed input."""
    order = like.sorted_indices
    if order is not None:
        outputs, lengths = outputs[order.to(outputs.device)], lengths[order.to(lengths.device)]
    data = pack_padded_sequence(outputs, lengths.cpu(), batch_first=True).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)
