"""The CPU gate update through the C kernels (``csrc/gates.c``, :mod:`native_build`): the
forward and backward of the torch path's in-place gate math, one pass each.

Each function answers False, having written nothing, where the kernels do not serve the call
(no library, a dtype other than fp32, a layout the row view cannot express, a traced or fake
tensor); the caller then runs the torch ops (:mod:`triton_convlstm.reference`), which compute
the same function. The results agree with those to float rounding (the activations are
polynomial approximations within a few ulp), not bit for bit.

Measured (one thread, 2-core box): a training step's update, forward and backward, 2.2-2.8x
the torch ops at B2 hid16 16x16 and 1.9-2.1x at B4 hid32 24x24 (the perf suite's
``test_cpu_gate_kernels_gate``); the forward alone at B1 hid16 16x16 ~12-19 us in C against
32-36 us (docs/PERF_NOTES.md, session 9).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import native_build
from .backend import exporting
from .layout import empty_like_layout
from .native_build import Plan, Rows

_F32 = torch.float32
_PLANS: dict = {}  # (threads, roles, sizes and strides) -> one Plan per thread, or None
_NEW_PLANS: dict = {}  # gate_forward_new's (threads, sizes, strides) -> (plans, relaid)
_MAX_PLANS = 4096
# Work (hidden elements) per thread below which one thread does the whole update: a hand-off
# to torch's OpenMP workers costs a few microseconds (to a Python pool ~20-50 us), the kernel
# ~5 ns an element. On 2 threads (2-core box, same-run ratios against the formulation) 8192
# against 32768: cpu-hid8 inference 1.11 vs 0.91x, cpu-m training 1.71 vs 1.66x.
ELEMENTS_PER_THREAD = 1 << 13
_POOL: list = []  # [ThreadPoolExecutor, its size, the process it was made in]
_POOL_LOCK = threading.Lock()


def _rows(t: Tensor, channels_last: bool) -> tuple[int, int] | None:
    """t (B, C, *spatial) as B x M rows of N unit-stride elements: its (per-sample, per-row)
    strides, or None where the view does not exist. Channels-last: rows are pixels, elements
    channels; channels-first: rows are channels, elements pixels."""
    shape, stride = t.shape, t.stride()
    if channels_last:
        if shape[1] > 1 and stride[1] != 1:
            return None
        step = row = stride[-1] if len(shape) > 2 else 1
    else:
        step, row = 1, stride[1]
    for k in reversed(range(2, len(shape))):  # the pixels: one run of ``step``-strided elements
        if shape[k] > 1 and stride[k] != step:
            return None
        step *= shape[k]
    return stride[0], row


def _no_overlap(t: Tensor) -> bool:
    """Whether no two elements of t share memory (strides in increasing order each past all
    the smaller dims reach; gaps allowed): a written tensor must not, or threads would race
    where torch ops raise."""
    return _no_overlap_of(tuple(t.shape), t.stride())


@functools.lru_cache(maxsize=1024)  # the training forward asks of its gates every step
def _no_overlap_of(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    reach = 1
    for stride, size in sorted((st, sz) for st, sz in zip(strides, shape) if sz > 1):
        if stride < reach:
            return False
        reach += stride * (size - 1)
    return True


def _split(elements: int, n_rows: int, threads: int) -> list[tuple[int, int]]:
    """The rows 0..n_rows as one range per thread: at most ``threads``, with at least
    ELEMENTS_PER_THREAD elements each."""
    parts = max(1, min(threads, elements // ELEMENTS_PER_THREAD, n_rows))
    return [(n_rows * k // parts, n_rows * (k + 1) // parts) for k in range(parts)]


def _make_plans(tensors: tuple[Tensor | None, ...], dz_index: int, outputs: tuple[int, ...],
                threads: int | None = None) -> list[Plan] | None:
    """The kernel's sizes for these tensors (the first gates-like (B, 4*hid, ...), the others
    (B, hid, ...) or, at ``dz_index``, gates-like; None entries absent; those at ``outputs``
    written), one Plan per thread (``threads``, default torch's count); None where the shapes
    disagree, a written tensor overlaps itself, or the row view does not fit them all."""
    z = tensors[0]
    if z.dim() < 2 or z.shape[1] % 4:
        return None
    b, hid = z.shape[0], z.shape[1] // 4
    for k, t in enumerate(tensors):
        channels = 4 * hid if k in (0, dz_index) else hid
        if t is not None and (t.shape != (b, channels, *z.shape[2:])
                              or (k in outputs and not _no_overlap(t))):
            return None
    pixels = math.prod(z.shape[2:])
    # One pixel fits either view (rows of channels then); channels-first reads long rows.
    channels_last = pixels == 1 or z.stride(-1) != 1
    rows = [Rows(0, 0) if t is None else _rows(t, channels_last) for t in tensors]
    if any(r is None for r in rows):
        return None
    n_rows, n_el = (pixels, hid) if channels_last else (hid, pixels)
    dz = tensors[dz_index] if dz_index else z
    plans = []
    threads = torch.get_num_threads() if threads is None else threads
    for m0, m1 in _split(b * pixels * hid, n_rows, threads):
        plan = Plan(B=b, m_begin=m0, m_end=m1, N=n_el, hid=hid, peep_on_n=int(channels_last))
        plan.gate_step[0], plan.gate_step[1] = hid * z.stride(1), hid * dz.stride(1)
        for k, r in enumerate(rows):
            plan.rows[k] = r if isinstance(r, Rows) else Rows(*r)
        plans.append(plan)
    return plans


def memoised(cache: dict, key, make, limit: int = _MAX_PLANS):
    """cache[key], made by ``make()`` the first time (None answers are kept too); a cache that
    holds ``limit`` entries (layouts seen: many shapes, say) is emptied first. The plan and
    geometry caches of native_gates, native_conv and native_step."""
    found = cache.get(key, cache)  # (the cache itself: a sentinel no entry can be)
    if found is cache:
        found = make()
        if len(cache) >= limit:
            cache.clear()
        cache[key] = found
    return found


def _plans(tensors: tuple[Tensor | None, ...], dz_index: int = 0,
           outputs: tuple[int, ...] = (2, 3)) -> list[Plan] | None:
    """:func:`_make_plans`, memoised by sizes, strides and torch's thread count: the loops
    call with the same buffers' layouts step after step. The defaults are the forward's."""
    key = (torch.get_num_threads(), dz_index, outputs,
           *[None if t is None else (t.shape, t.stride()) for t in tensors])
    return memoised(_PLANS, key, lambda: _make_plans(tensors, dz_index, outputs))


def _library():
    """The kernels, or None where they cannot run: not built, or a tracer (dynamo, jit.trace)
    is recording the call (it would not see a ctypes call), an exporter included. Asked
    first: dynamo then never traces into the loader."""
    if torch.compiler.is_compiling() or exporting():
        return None
    # functorch transforms (vmap, grad, jvp) and forward-mode AD must see torch ops (their
    # tensors carry more than memory), and so must dispatch modes (make_fx records the ops it
    # sees) unless they say they need not.
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return None
    if torch._C._len_torch_dispatch_stack() and not _modes_allow_kernels():
        return None
    return native_build.library()


def _modes_allow_kernels() -> bool:
    """Whether every active dispatch mode sets ``allows_opaque_kernels = True``: it may miss
    the kernels' work (it counts tensors, which the kernels do not create, as the bench's
    TensorMemoryTracker does)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return all(getattr(m, "allows_opaque_kernels", False)
               for m in _get_current_dispatch_mode_stack())


def _served(tensors: tuple[Tensor | None, ...]) -> bool:
    """fp32 plain CPU tensors (not fake, not a subclass)."""
    for t in tensors:
        if t is not None and (type(t) is not Tensor or t.dtype != _F32 or not t.is_cpu):
            return False
    return True


def _vectors_fit(peephole: Tensor | None, valid: Tensor | None, z: Tensor) -> bool:
    """A (3, hid) peephole and a multiplier of one value per sample, or None: what the kernels
    index without bounds."""
    return ((peephole is None or peephole.shape == (3, z.shape[1] // 4))
            and (valid is None or valid.numel() == z.shape[0]))


def _vector(t: Tensor | None) -> Tensor | None:
    """A contiguous fp32 copy of t unless it already is one (peepholes, valid multipliers)."""
    if t is None or (t.dtype == _F32 and t.is_contiguous()):
        return t
    return t.detach().to(_F32).contiguous()


def _like(t: Tensor | None, like: Tensor) -> Tensor | None:
    """t where its rows are those of ``like`` (a tensor of t's dims, maybe another channel
    count), else a copy of t laid out as ``like``."""
    if t is None or _rows(t, like.stride(1) == 1 and like.shape[1] > 1) is not None:
        return t
    return empty_like_layout(like, t.shape[1], shape=t.shape).copy_(t)


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# tcl_parallel's names for the entry points it runs in shares (kernels.h's tcl_parallel_fn).
_PARALLEL_FNS = {"tcl_gate_forward": 0, "tcl_gate_backward": 1, "tcl_winograd3x3": 2,
                 "tcl_winograd_weight_grad": 3}


def _run(fn, plans: list, *args) -> None:
    """fn(plan, *args) for each plan, on threads when there are several, each writing only its
    own rows. A list among args gives each plan its own item (per-thread accumulators,
    scratch). The threads: torch's own OpenMP workers (``tcl_parallel``) where the library
    was built with torch's runtime, else a pool here (ctypes drops the GIL for the call)."""
    if len(plans) == 1 and list not in map(type, args):
        fn(plans[0], *args)  # (the common small update, without the list building below)
        return
    calls = [(p, *(a[k] if isinstance(a, list) else a for a in args))
             for k, p in enumerate(plans)]
    if len(calls) == 1:
        fn(*calls[0])
        return
    if native_build.parallel():
        _run_parallel(fn, calls)
        return
    with _POOL_LOCK:
        # A forked child inherits the pool without its threads: it makes its own. A pool
        # outgrown is left to finish what another thread may have submitted to it.
        if not _POOL or _POOL[1] < len(calls) or _POOL[2] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            _POOL[:] = [ThreadPoolExecutor(len(calls), thread_name_prefix="convlstm-gates"),
                        len(calls), os.getpid()]
        pool = _POOL[0]
    futures = [pool.submit(fn, *call) for call in calls[1:]]
    fn(*calls[0])  # this thread does the first share
    for f in futures:
        f.result()


def _run_parallel(fn, calls: list[tuple]) -> None:
    """The calls (plan, *pointers) in one tcl_parallel: a share per OpenMP thread."""
    n, width = len(calls), len(calls[0]) - 1
    plans = (ctypes.c_void_p * n)(*[ctypes.addressof(c[0]) for c in calls])
    args = (ctypes.c_void_p * (n * width))(*[a for c in calls for a in c[1:]])
    declined = native_build.library().tcl_parallel(_PARALLEL_FNS[fn.__name__], n, plans, args,
                                                   width)
    if declined:  # (the plans were made for calls the kernels serve: a bug, not an input)
        raise RuntimeError(f"{fn.__name__}: {declined} of {n} shares declined")


def gate_forward(pre: Tensor, gates: Tensor | None, c_prev: Tensor, peephole: Tensor | None,
                 h_out: Tensor, c_out: Tensor, valid: Tensor | None) -> bool:
    """:func:`triton_convlstm.reference.gate_forward_inplace_ref` by the C kernel.

    Args:
        pre: (B, 4*hidden, *spatial) fp32 pre-activations, i, f, o, g.
        gates: like pre (may be pre itself): where the activated gates go, or None.
        c_prev: (B, hidden, *spatial) fp32; c_out, h_out: like it, written (c_out may be c_prev).
        peephole: (3, hidden) or None.
        valid: (B, 1, ...) step multiplier (:func:`reference.step_valid`) or None.

    Returns:
        True when done; False when the kernels do not serve the call (nothing written).
    """
    lib = _library()
    tensors = (pre, c_prev, c_out, h_out)
    if lib is None or not _served(tensors) or (gates is not None and (
            not _served((gates,)) or gates.shape != pre.shape or gates.stride() != pre.stride()
            or not _no_overlap(gates))):
        return False
    plans = _plans(tensors)
    if plans is None or not _vectors_fit(peephole, valid, pre):
        return False
    # (the converted copies held in names until the call returns: a pointer does not keep
    # its tensor alive)
    peephole, valid = _vector(peephole), _vector(valid)
    _run(lib.tcl_gate_forward, plans, pre.data_ptr(), _ptr(gates), c_prev.data_ptr(),
         c_out.data_ptr(), h_out.data_ptr(), _ptr(peephole), _ptr(valid))
    return True


def gate_backward(gates: Tensor, c_prev: Tensor, c: Tensor, peephole: Tensor | None,
                  dh: Tensor | None, dh2: Tensor | None, dc: Tensor | None, dz_out: Tensor,
                  dc_prev_out: Tensor) -> tuple[bool, Tensor | None]:
    """:func:`triton_convlstm.reference.gate_backward_from_gates_ref` by the C kernel, with the
    two h gradients summed inside (either may be None).

    Args:
        gates: (B, 4*hidden, *spatial) fp32 activated i, f, o, g.
        c_prev, c: (B, hidden, *spatial) fp32, the step's cells.
        peephole: (3, hidden) or None.
        dh, dh2, dc: (B, hidden, *spatial) gradients, or None (zeros).
        dz_out: like gates (may be gates): where dz goes.
        dc_prev_out: like c (may be dc): where dc_prev goes.

    Returns:
        (done, the peephole gradient (3, hidden) fp32 or None); when not done nothing was
        written.
    """
    lib = _library()
    tensors = (gates, c_prev, c, dh, dh2, dc, dz_out, dc_prev_out)
    if lib is None or not _served(tensors):
        return False, None
    plans = _plans(tensors, dz_index=6, outputs=(6, 7))
    if not _vectors_fit(peephole, None, gates):
        return False, None
    if plans is None:
        # The output's gradient often comes in the caller's layout (contiguous frames), the
        # loop's buffers channels-last: the read-only gradients copied into c's layout.
        dh, dh2, dc = (_like(t, c) for t in (dh, dh2, dc))
        tensors = (gates, c_prev, c, dh, dh2, dc, dz_out, dc_prev_out)
        plans = _plans(tensors, dz_index=6, outputs=(6, 7))
        if plans is None:
            return False, None
    p = _vector(peephole)
    # One peephole-gradient accumulator per thread (each adds into its own), summed after.
    dpeep = None if p is None else torch.zeros(len(plans), 3, gates.shape[1] // 4, dtype=_F32)
    _run(lib.tcl_gate_backward, plans, gates.data_ptr(), c_prev.data_ptr(), c.data_ptr(),
         _ptr(dh), _ptr(dh2), _ptr(dc), dz_out.data_ptr(), dc_prev_out.data_ptr(), _ptr(p),
         [None] * len(plans) if p is None else [a.data_ptr() for a in dpeep])
    return True, None if dpeep is None else dpeep.sum(0)


def gate_forward_new(z: Tensor, c_prev: Tensor,
                     peephole: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """:func:`triton_convlstm.reference.gate_forward_ref` by the C kernel where nothing needs a
    gradient (the one-frame inference step): (h, c) in new tensors laid out as c_prev, or None
    where the kernels do not serve the call (or autograd must see it).

    The streaming step's hot path (a hid16 16x16 frame: ~11 us of kernel), so its checks are
    written out and its plans memoised apart from :func:`_plans`'.

    Args:
        z: (B, 4*hidden, *spatial) fp32 pre-activations, i, f, o, g.
        c_prev: (B, hidden, *spatial) fp32.
        peephole: (3, hidden) or None.
    """
    lib = _library()
    if (lib is None or type(z) is not Tensor or type(c_prev) is not Tensor
            or z.dtype != _F32 or c_prev.dtype != _F32 or not (z.is_cpu and c_prev.is_cpu)):
        return None  # (before anything a tracer would see)
    if torch.is_grad_enabled() and (z.requires_grad or c_prev.requires_grad
                                    or (peephole is not None and peephole.requires_grad)):
        return None
    if peephole is not None and peephole.shape != (3, z.shape[1] // 4):
        return None
    key = (torch.get_num_threads(), z.shape, z.stride(), c_prev.shape, c_prev.stride())
    plans, relaid = memoised(_NEW_PLANS, key, lambda: _new_plans(z, c_prev))
    if plans is None:
        return None
    if relaid:  # (frames of >= CHANNELS_LAST_PIXELS are convolved channels-last, c_prev not)
        c_prev = _like(c_prev, z)
    h, c = torch.empty_like(c_prev), torch.empty_like(c_prev)
    peephole = _vector(peephole)  # (held until the call returns)
    _run(lib.tcl_gate_forward, plans, z.data_ptr(), None, c_prev.data_ptr(), c.data_ptr(),
         h.data_ptr(), _ptr(peephole), None)
    return h, c


def _new_plans(z: Tensor, c_prev: Tensor) -> tuple[list[Plan] | None, bool]:
    """gate_forward_new's plans for z and c_prev, the new h and c laid out as c_prev (or as
    :func:`_like` relays it: the flag), or None where the kernels do not serve them."""
    relaid = False
    if _make_plans((z, c_prev, c_prev, c_prev), 0, ()) is None:
        c_prev, relaid = _like(c_prev, z), True
    if _make_plans((z, c_prev, c_prev, c_prev), 0, ()) is None:
        return None, relaid
    # The new h and c are dense whatever gaps c_prev has: one plan reads the four.
    new = torch.empty_like(c_prev)
    return _make_plans((z, c_prev, new, new), 0, (2, 3)), relaid
