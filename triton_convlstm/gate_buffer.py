"""The saved gates' buffer on CPU, with a mark saying whether a backward has overwritten it.

The backward overwrites the saved gates with their gradients (no second (T, B, 4*hid) buffer:
a smaller working set, and at cpu-s T=64 a 10-15% faster backward than writing them elsewhere).
Eagerly the autograd.Function's ctx remembers that it did, so a second backward through the
same forward (``retain_graph=True``) knows to run the forward again first. Under torch.compile
the backward is an op whose only memory is its tensors, so the buffer carries the mark itself:
a few bytes past the gates' last element, in the same storage.

The mark travels with the gates wherever the storage goes. A saved-tensor hook that copies them
(``save_on_cpu``, offloading) makes a tensor without the mark, which is then left intact and
never overwritten. CPU only: on CUDA a captured backward replays without running this check.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import empty_seq

_MAGIC = b"tclgate"  # the mark's first bytes: a storage that merely happens to be longer fails
_FRESH, _USED = 0, 1
_MARK_BYTES = len(_MAGIC) + 1  # then the state byte


def empty_gates(t: int, b: int, ch: int, *spatial: int, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """:func:`~triton_convlstm.layout.empty_seq`'s buffer, marked fresh: the gates a backward
    may overwrite once (:func:`claim`).

    Args:
        t, b, ch, spatial, dtype: as empty_seq's.
        device: a CPU device (elsewhere the plain empty_seq buffer is returned).

    Returns:
        (t, b, ch, *spatial), uninitialised, with empty_seq's strides.
    """
    like = empty_seq(t, b, ch, *spatial, dtype=dtype, device="meta", layout_of=device)
    if torch.device(device).type != "cpu":
        return empty_seq(t, b, ch, *spatial, dtype=dtype, device=device)
    size = like.numel() * like.element_size()
    flat = torch.empty(size + _MARK_BYTES, dtype=torch.uint8, device=device)
    # (torch.tensor, not a buffer: under a fake mode, opcheck's, this is a fake constant too)
    flat[size:] = torch.tensor([*_MAGIC, _FRESH], dtype=torch.uint8)
    return flat[:size].view(dtype).as_strided(like.shape, like.stride())


def _mark(gates: Tensor) -> Tensor | None:
    """The mark's bytes (a uint8 view), or None where the storage has none just past the
    gates' last element (a copy, or another producer's buffer)."""
    if gates.device.type != "cpu" or gates.numel() == 0 or gates.storage_offset() != 0:
        return None
    extent = 1 + sum((n - 1) * s for n, s in zip(gates.shape, gates.stride()))
    size = extent * gates.element_size()
    storage = gates.untyped_storage()
    if storage.nbytes() != size + _MARK_BYTES:
        return None
    mark = torch.empty(0, dtype=torch.uint8).set_(storage, size, (_MARK_BYTES,))
    return mark if bytes(mark[:-1].tolist()) == _MAGIC else None


def claim(gates: Tensor) -> bool | None:
    """Claim the gates for a backward that overwrites them.

    Returns:
        True: they were fresh, and are now marked used (mark first: a backward that fails
        half-way leaves them garbage too). False: a backward already overwrote them (run the
        forward again). None: unmarked, not to be overwritten.
    """
    mark = _mark(gates)
    if mark is None:
        return None
    if int(mark[-1]) != _FRESH:
        return False
    mark[-1] = _USED
    return True
