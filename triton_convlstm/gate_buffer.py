"""The saved gates' buffer on CPU, with a mark saying whether a backward has overwritten it.

The backward overwrites the saved gates with their gradients (no second (T, B, 4*hid) buffer:
a smaller working set, and at cpu-s T=64 a 10-15% faster backward than writing them elsewhere).
Eagerly the autograd.Function's ctx remembers that it did, so a second backward through the
same forward (``retain_graph=True``) knows to run the forward again first. Under torch.compile
the backward is an op whose only memory is its tensors, so the buffer carries the mark itself:
a few bytes past the gates' last element, in the same storage.

The mark travels with the storage: a saved-tensor hook that keeps the tensor (``save_on_cpu``
on CPU tensors passes it through) or copies its whole storage (``torch.save``, deepcopy) keeps
a mark, and each such copy is a whole fresh set of gates; one that copies the elements alone
(``clone``) makes a tensor without the mark, which is left intact. CPU only: on CUDA a
captured backward replays without running this check.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .layout import empty_seq, frames_channels_last

# The mark: one int64 at the first 8-byte boundary past the gates. Its value says fresh or used;
# a storage that merely happens to be longer holds neither (odds 2**-63).
_FRESH = 0x74636C6761746530  # "tclgate0"
_USED = _FRESH + 1


def _mark_offset(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


def empty_gates(t: int, b: int, ch: int, *spatial: int, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """:func:`~triton_convlstm.layout.empty_seq`'s buffer, marked fresh on CPU: the gates a
    backward may overwrite once (:func:`claim`).

    Args:
        t, b, ch, spatial, dtype, device: as empty_seq's.

    Returns:
        (t, b, ch, *spatial), uninitialised, with empty_seq's strides.
    """
    if getattr(device, "type", device) != "cpu":
        return empty_seq(t, b, ch, *spatial, dtype=dtype, device=device)
    numel = math.prod((t, b, ch, *spatial))
    at = _mark_offset(numel * dtype.itemsize) // dtype.itemsize  # in elements
    flat = torch.empty(at + 8 // dtype.itemsize, dtype=dtype, device=device)
    # (fill_, not a copy of a constant: under a fake mode, opcheck's, this runs on fakes too)
    flat[at:].view(torch.int64).fill_(_FRESH)
    if not frames_channels_last(device, len(spatial)):
        return flat[:numel].view(t, b, ch, *spatial)
    return flat[:numel].view(t, b, *spatial, ch).movedim(-1, 2)


def _mark(gates: Tensor) -> Tensor | None:
    """The mark (a one-int64 view), or None where the storage has none just past the gates'
    last element (a copy, or another producer's buffer)."""
    if gates.device.type != "cpu" or gates.numel() == 0 or gates.storage_offset() != 0:
        return None
    extent = 1 + sum((n - 1) * s for n, s in zip(gates.shape, gates.stride()))
    at = _mark_offset(extent * gates.element_size())
    storage = gates.untyped_storage()
    if storage.nbytes() != at + 8:
        return None
    mark = torch.empty(0, dtype=torch.int64).set_(storage, at // 8, (1,))
    return mark if mark.item() in (_FRESH, _USED) else None


def claim(gates: Tensor) -> bool | None:
    """Claim the gates for a backward that overwrites them.

    Returns:
        True: they were fresh, and are now marked used (marked first: a backward that fails
        half-way leaves them garbage too). False: a backward already overwrote them (run the
        forward again). None: unmarked, not to be overwritten.
    """
    mark = _mark(gates)
    if mark is None:
        return None
    if mark.item() == _USED:
        return False
    mark.fill_(_USED)
    return True
