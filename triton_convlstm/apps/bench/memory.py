"""Peak bytes of live tensors during a call, on any device, without the CUDA allocator.

    with TensorMemoryTracker() as mem:
        step()
    print(mem.peak_bytes / 2**20, "MiB")

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op run inside the
``with`` block, including those inside ``autograd.Function.forward``/``backward`` and the
backward pass of ``torch.autograd.grad`` (the engine runs it with the caller's dispatch modes).
Each op output's storage is counted once, when first seen, and subtracted when the storage is
freed (a ``weakref.finalize`` on the storage object, which torch keeps alive exactly as long
as the storage). The peak is taken after each op, so it is the most live tensor bytes at any
op boundary.

What it counts: tensors created by torch ops during the call: activations, what autograd saves
for backward, gradients, the implementation's own buffers. What it does not:

* tensors that existed before the call (weights, inputs, anything cached from an earlier call),
  nor views of them or in-place writes into them;
* memory a kernel allocates without returning it as a tensor (oneDNN/cuDNN workspaces, an op's
  internal temporaries);
* CUDA-graph memory pools, the caching allocator's slack, RSS.

Code compiled by ``torch.compile`` is not measured: Dynamo does not run compiled frames under a
dispatch mode, so the tracker sees the uncompiled function's ops instead.

So it is not what ``torch.cuda.max_memory_allocated`` reports; compare its numbers only with
each other. It is exact and repeatable (no allocator, no timing), which makes it usable as a
CI gate on CPU. Counting continues after the block ends, so ``current_bytes`` then says what
the call left alive.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(tree):
    """The (key, storage) of each tensor with real memory in a pytree of op arguments or
    outputs. Key: the C++ storage's address, the same for every view and stable across a
    resize (a data pointer is neither)."""
    for t in tree_flatten(tree)[0]:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            continue
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested: no single storage
            continue
        yield storage._cdata, storage


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created by ops while active (see module doc).

    Attributes:
        current_bytes: bytes of the counted storages alive now (kept up to date after the
            ``with`` block ends, as they are freed).
        peak_bytes: the most ``current_bytes`` seen after any op.
    """

    # The CPU gate kernels (native_gates) run under it: they create no tensor, so what is
    # counted is the default path's memory, not the torch-op fallback's.
    allows_opaque_kernels = True

    def __init__(self) -> None:
        super().__init__()
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, int] = {}  # storage key -> bytes counted for it

    def reset_peak(self) -> None:
        """Restart the peak from ``current_bytes``: later peaks ignore what was freed before."""
        self.peak_bytes = self.current_bytes

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: tuple[type, ...],
                           args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        """Run one aten op and count the storages of its outputs that are new to the tracker."""
        kwargs = kwargs or {}
        # A storage that comes back but was passed in and is not ours predates the call.
        before = {key for key, _ in _storages((args, kwargs)) if key not in self._live}
        out = func(*args, **kwargs)
        for key, storage in _storages(out):
            if key in before:
                continue
            size = storage.nbytes()
            if key in self._live:  # a view or in-place result; a resize changes its size
                self.current_bytes += size - self._live[key]
            else:
                weakref.finalize(storage, self._free, key)
                self.current_bytes += size
            self._live[key] = size
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        return out

    def _free(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key)
