"""One ConvLSTM layer over a whole sequence: the forward and backward time loops.

Layout: everything is time-major, ``(T, B, channels, *spatial)`` with 1 to 3 spatial dims,
each frame in layout.py's frame layout (channels-last but for 3-d on CPU). The input
convolution runs once over all T*B frames; each step runs one hidden convolution and one fused
gate update that writes h_t straight into its slot of the output buffer. The backward runs the
gate gradient and the hidden input-gradient convolution per step, and every weight/bias gradient
once over all steps.

What is saved for the backward: the gates (the Triton path keeps the summed pre-activations in
the compute dtype, the torch path the activated gates in the state dtype), the cells c_1..c_{T-1}
(state dtype; c_T is the returned last cell) and the outputs h (already returned).

Memory: where the dtypes agree, the saved gates live in the input convolution's own output (the
gate update overwrites each step's slot in place), and the backward overwrites each step's gates
with their gradients once read; so training needs no (T, B, 4*hidden, H, W) buffer besides the
saved one, in either direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import native_conv, native_step, native_winograd, reference
from .conv import conv_same, conv_same_input_grad, conv_same_weight_grad
from .gate_buffer import empty_gates
from .gate_launchers import gate_forward_torch, gate_launchers, saved_gates_dtype
from .layout import (
    cat_channels,
    conv_layout,
    empty_seq,
    frames_as_seq,
    frames_channels_last,
    in_seq_layout,
    seq_frames,
)


@dataclass(frozen=True)
class LayerSpec:
    """What the loops need besides tensors: the convolutions' dilation (along H, W), the gate
    backend, and the options below. Frozen (hashable): it is part of the graph caches' keys."""

    dilation: tuple[int, int]
    backend: str  # "torch" or "triton"
    # False: training saves only h and c; the backward recomputes the gates chunk by chunk
    # (one more input convolution and T hidden convolutions, for no (T, B, 4*hid) saved buffer).
    keep_gates: bool = True
    # With the Triton backend: each forward step is one kernel, the convolution of [x_t, h]
    # with the gate update as its epilogue (kernels/fused_step.py; experimental, unmeasured on
    # a GPU). The backward is the split path's. Zero padding only (other modes take the split
    # path).
    fused: bool = False
    # The convolutions' padding, as nn.Conv2d's padding_mode (conv.PADDING_MODES).
    padding_mode: str = "zeros"

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None = None,
             h: Tensor | None = None) -> Tensor:
        """:func:`~triton_convlstm.conv.conv_same` of x, or of [x, h] where h is given, with
        this layer's dilation and padding (small CPU frames: :mod:`native_conv`'s products,
        which read x and h where they are)."""
        if self._native():
            z = native_conv.conv_small(x, h, weight, bias, self.dilation,
                                       frames_channels_last(x.device, x.dim() - 2))
            if z is not None:
                return z
        if h is not None:
            x = cat_channels(x, h)
        return conv_same(x, weight, self.dilation, bias, padding_mode=self.padding_mode)

    def conv_input_grad(self, grad: Tensor, x_shape: Sequence[int], weight: Tensor) -> Tensor:
        """:func:`~triton_convlstm.conv.conv_same_input_grad` with this layer's settings."""
        if self.backend == "torch":  # (a 1x1 kernel pads nothing: any padding mode)
            dx = native_conv.pointwise_input_grad(grad, x_shape, weight)
            if dx is not None:
                return dx
        if self._native():
            last = frames_channels_last(grad.device, grad.dim() - 2)
            dx = native_winograd.input_grad(grad, x_shape, weight, self.dilation, last)
            if dx is None:
                dx = native_conv.conv_input_grad_small(grad, x_shape, weight, self.dilation,
                                                       last)
            if dx is not None:
                return dx
        return conv_same_input_grad(grad, x_shape, weight, self.dilation,
                                    padding_mode=self.padding_mode)

    def conv_weight_grad(self, grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        """:func:`~triton_convlstm.conv.conv_same_weight_grad` with this layer's settings."""
        if self._native():
            dw = native_winograd.weight_grad(grad, x, weight, self.dilation,
                                             frames_channels_last(grad.device, grad.dim() - 2))
            if dw is None:
                dw = native_conv.conv_weight_grad_small(grad, x, weight, self.dilation)
            if dw is not None:
                return dw
        return conv_same_weight_grad(grad, x, weight, self.dilation,
                                     padding_mode=self.padding_mode)

    def _native(self) -> bool:
        """Whether :mod:`native_conv` may serve (it checks the tensors): the torch path's
        zero padding (the Triton path, the interpreter's included, keeps torch's convolution)."""
        return self.backend == "torch" and self.padding_mode == "zeros"


def output_buffers(x: Tensor, weight: Tensor, save: bool, backend: str,
                   z_seq: Tensor | None = None,
                   keep_gates: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The uninitialised outputs of :func:`layer_forward` (the op's fake kernel returns these
    too, on the meta device, so the promised strides are the real ones).

    Args:
        x: (T, B, C, H, W) input; only its shape, dtype and device are read.
        weight: (4*hid, C+hid, kh, kw); only its shape is read.
        save: allocate what the backward reads (c_seq, and z_seq unless ``keep_gates`` is
            False). Without (inference) c_seq and z_seq are empty.
        backend: "triton" or "torch": picks z_seq's dtype (:func:`saved_gates_dtype`).
        z_seq: the caller's own buffer for the saved gates (the input convolution's output),
            used as is where saved gates are kept; else None to allocate one.
        keep_gates: False: z_seq is empty (the backward recomputes the gates).

    Returns:
        (h_seq, c_last, c_seq, z_seq), all in the sequence layout (:func:`empty_seq`):
        h_seq (T, B, hid, H, W) in x's dtype; c_last (B, hid, H, W) in the state dtype;
        c_seq (T-1, B, hid, H, W) in the state dtype, else empty; z_seq (T, B, 4*hid, H, W)
        in ``saved_gates_dtype(x.dtype, backend)``, else empty in x's dtype.
    """
    t, b, _, *spatial = x.shape
    hid = weight.shape[0] // 4
    sdt = reference.state_dtype(x.dtype)
    kw = dict(device=x.device)
    h_seq = empty_seq(t, b, hid, *spatial, dtype=x.dtype, **kw)
    c_last = empty_seq(1, b, hid, *spatial, dtype=sdt, **kw)[0]
    if save:
        c_seq = empty_seq(t - 1, b, hid, *spatial, dtype=sdt, **kw)
        if not keep_gates:
            z_seq = torch.empty(0, dtype=x.dtype, **kw)
        elif z_seq is None:
            zdt = saved_gates_dtype(x.dtype, backend)
            z_seq = empty_gates(t, b, 4 * hid, *spatial, dtype=zdt, **kw)
    else:
        c_seq = torch.empty(0, dtype=sdt, **kw)
        z_seq = torch.empty(0, dtype=x.dtype, **kw)
    return h_seq, c_last, c_seq, z_seq


# ---- the loops ---------------------------------------------------------------------------------


# The input convolution's output (forward) and the gate gradients (backward) span 4*hidden
# channels for every step: batched over all T steps they can outweigh everything saved for the
# backward (2.7 GB at B16 T10 hid128 128x128 bf16). Steps are batched in chunks of at most this
# many bytes instead: whole sequences at small shapes, a few steps per call at large ones, where
# one step's convolution is already large enough to run efficiently.
CHUNK_BYTES = 1 << 28


def steps_per_chunk(t: int, b: int, hid: int, pixels: int, dtype: torch.dtype) -> int:
    """How many steps' (B, 4*hid, H, W) buffers are batched into one call (see CHUNK_BYTES).

    Args:
        t, b, hid, pixels: steps, batch, hidden channels, and pixels per frame (the product
            of its spatial sizes).
        dtype: the buffer's dtype.

    Returns:
        The most steps (up to t) whose buffers fit in CHUNK_BYTES, but at least 1.
    """
    per_step = b * 4 * hid * pixels * dtype.itemsize
    return max(1, min(t, CHUNK_BYTES // per_step))


def _split(weight: Tensor, cin: int):
    """The input and hidden parts of the combined weight, in the frames' layout."""
    return conv_layout(weight[:, :cin]), conv_layout(weight[:, cin:])


def _initial_cell(c_last: Tensor, c0: Tensor | None) -> Tensor:
    """c_last holding the initial cell (zeros without c0): the first step's c_prev. The loops
    then update it in place in inference, or leave it for the last step's cell in training."""
    return c_last.zero_() if c0 is None else c_last.copy_(c0)


class _Steps:
    """What varies the plain loop per sample: the lengths (the gate update masks the steps past
    each sample's end) and the recurrent dropout mask (on h where it feeds the hidden
    convolution).

    The kernels read lengths and the step index on the device. The torch twins get each step's
    multiplier from one (T, B, 1, ...) table made per call (a comparison, a cast and a view per
    step cost more than the masking itself at small shapes). Lengths in host memory (the CPU
    path) also tell which leading steps have no sample past its end: those run unmasked.
    """

    def __init__(self, lengths: Tensor | None, recurrent_mask: Tensor | None, backend: str,
                 x: Tensor) -> None:
        self.lengths, self.mask, self.backend = lengths, recurrent_mask, backend
        self.scratch = None  # step_grad's
        self.plain = lengths is None and recurrent_mask is None
        self.table = None
        self.unmasked = x.shape[0]  # steps before this one need no mask
        if lengths is None:
            return
        self.unmasked = int(lengths.min()) if lengths.device.type == "cpu" and len(lengths) else 0
        if backend != "triton":
            steps = torch.arange(x.shape[0], device=lengths.device).unsqueeze(1)
            self.table = reference.step_valid(lengths, steps, x.dim(),
                                              reference.state_dtype(x.dtype))

    def at(self, step: int) -> dict:
        """The gate update's keyword arguments for ``step``."""
        if step < self.unmasked:
            return {}
        if self.table is not None:
            return {"valid": self.table[step]}
        return {"lengths": self.lengths, "step": step}

    def output_grad(self, grad_h_seq: Tensor | None) -> Tensor | None:
        """The output gradient as the torch twins read it: zero past each sample's end (the
        kernels skip it themselves), so that a non-finite one there cannot leak through 0 * inf;
        written in the sequence layout (see :meth:`step_grad`)."""
        if grad_h_seq is None or self.table is None:
            return grad_h_seq
        out = empty_seq(*grad_h_seq.shape, dtype=grad_h_seq.dtype, device=grad_h_seq.device)
        return torch.where(self.table.bool(), grad_h_seq, grad_h_seq.new_zeros(()), out=out)

    def step_grad(self, grad_h_seq: Tensor | None, step: int, like: Tensor) -> Tensor | None:
        """Step ``step``'s output gradient for the torch twins, laid out as ``like`` (the
        loop's buffers): it often comes in the caller's layout (contiguous frames), which the
        CPU gate kernels would copy per step and torch ops read slowly; copied into one scratch
        reused by every step (a whole-sequence copy would add T frames to the backward's
        peak). The Triton kernels read any strides as fast: as given."""
        if grad_h_seq is None:
            return None
        dh = grad_h_seq[step]
        if self.backend == "triton" or dh.stride() == like.stride():
            return dh
        if self.scratch is None:
            self.scratch = torch.empty_like(like, dtype=dh.dtype)
        return self.scratch.copy_(dh)

    def recurrent(self, h: Tensor) -> Tensor:
        """h as the hidden convolution reads it (any leading dims before B)."""
        return h if self.mask is None else h * self.mask


def layer_forward(x: Tensor, weight: Tensor, bias: Tensor | None, peephole: Tensor | None,
                  h0: Tensor | None, c0: Tensor | None, spec: LayerSpec, save: bool,
                  lengths: Tensor | None = None,
                  recurrent_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One layer over the whole sequence: the forward time loop.

    Runs one of three loops with the same outputs: the fused step per step (Triton with
    ``spec.fused``, where its int32 offsets fit), one convolution of [x_t, h_{t-1}] per step
    (:func:`cat_convs`: torch on CPU), or the split form, the input convolution over all steps
    in chunks plus a hidden convolution per step.

    Args:
        x: (T, B, C, H, W), any strides (copied once into the sequence layout if not in it).
        weight: (4*hid, C+hid, kh, kw), the input channels' part first, then the hidden's;
            gates i, f, o, g along the output channels.
        bias: (4*hid,) or None.
        peephole: (3, hid) (rows i, f, o) or None.
        h0: (B, hid, H, W) in x's dtype, or None (zeros).
        c0: (B, hid, H, W) in the state dtype, or None (zeros).
        spec: dilation, backend and options (:class:`LayerSpec`).
        save: keep what :func:`layer_backward` reads (training): the cells c_1..c_{T-1} in
            c_seq, and unless ``spec.keep_gates`` is False the gates in z_seq (the Triton path
            the summed pre-activations in x's dtype, the torch path the activated gates in the
            state dtype). Without, c_seq and z_seq are empty and the cell is updated in place.
        lengths: (B,) integer on x's device, or None (every sample T steps). Sample b's steps
            t >= lengths[b] keep its cell and write zeros to h_seq (the gate update does it,
            reading lengths on the device): c_last is its cell after step lengths[b]-1, and
            its last h is h_seq[lengths[b]-1] (the caller picks it).
        recurrent_mask: (B, hid, H, W) in x's dtype, or None: multiplies h_{t-1} where it
            feeds the hidden convolution (variational dropout's mask, scaled); h_seq itself is
            not masked.

    Returns:
        (h_seq, c_last, c_seq, z_seq), laid out as :func:`output_buffers` says:
        h_seq (T, B, hid, H, W) in x's dtype, c_last (B, hid, H, W) the last cell in the state
        dtype, c_seq (T-1, B, hid, H, W) or empty, z_seq (T, B, 4*hid, H, W) or empty.
    """
    steps = _Steps(lengths, recurrent_mask, spec.backend, x)
    if cat_convs(spec, x):  # (reads x's frames where they are: no sequence-layout copy)
        return _layer_forward_cat(x, weight, bias, peephole, h0, c0, spec, save, steps)
    frames = seq_frames(x)
    if (spec.fused and spec.backend == "triton" and spec.padding_mode == "zeros"
            and steps.plain and _fused_fits(x, weight)):
        return _layer_forward_fused(x, weight, bias, peephole, h0, c0, spec, save, frames)
    gate_forward, _ = gate_launchers(spec.backend)
    t, b, cin, *spatial = x.shape
    pixels = math.prod(spatial)
    w_x, w_h = _split(weight, cin)
    # The kernels add the bias themselves (a bias on a bf16 channels_last cuDNN convolution ran
    # 2-3x slower); on CPU oneDNN adds it for free inside the input convolution, a pass saved.
    conv_bias, gate_bias = (bias, None) if spec.backend == "torch" else (None, bias)

    # Training: when z_seq's dtype is the input's, the input convolution over all steps writes
    # z_seq itself and each step's gate update overwrites its slot in place: no extra buffer
    # (and no reason to chunk). Otherwise (inference, or torch gates in fp32 for bf16 inputs)
    # zx is a temporary, computed in chunks of steps to bound its size.
    save_z = save and spec.keep_gates
    zx_all = None
    if save_z and saved_gates_dtype(x.dtype, spec.backend) == x.dtype and t > 0:
        zx_all = frames_as_seq(spec.conv(frames, w_x, conv_bias), t, b)
    # z_seq must have the strides the fake kernels promise (they allocate with empty_seq).
    given = zx_all if zx_all is not None and in_seq_layout(zx_all) else None
    h_seq, c_last, c_seq, z_seq = output_buffers(x, weight, save, spec.backend, given,
                                                 spec.keep_gates)
    if zx_all is not None and given is None:  # an unusual layout came back: one copy
        z_seq.copy_(zx_all)
    in_place = zx_all is not None
    if in_place:
        chunk = t
    elif save and not spec.keep_gates:  # the temporary is bounded as the backward's
        chunk = recompute_steps(t, b, w_h.shape[1], pixels, x.dtype)
    else:
        chunk = steps_per_chunk(t, b, w_h.shape[1], pixels, x.dtype)

    c_prev, h_prev = _initial_cell(c_last, c0), h0
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        if in_place:
            zx = z_seq
        else:
            zx = spec.conv(frames[t0 * b : t1 * b], w_x, conv_bias)
            zx = zx.unflatten(0, (t1 - t0, b))
        for step in range(t0, t1):
            zh = None if h_prev is None else spec.conv(steps.recurrent(h_prev), w_h)
            # Saving: c_t goes to its slot in c_seq (the last one to c_last); inference: c is
            # updated in place in c_last (the kernels read each element before writing it).
            c_out = c_seq[step] if save and step < t - 1 else c_last
            gate_forward(
                zx[step - t0], zh, gate_bias, c_prev, peephole, h_out=h_seq[step], c_out=c_out,
                z_out=z_seq[step] if save_z else None, save_z=save_z, **steps.at(step),
            )
            c_prev, h_prev = c_out, h_seq[step]
    return h_seq, c_last, c_seq, z_seq


# With recomputed gates, the (T, B, 4*hid) buffer exists a chunk at a time: at most this
# fraction of the sequence (and CHUNK_BYTES), so the saving is not spent again in the backward.
RECOMPUTE_FRACTION = 4


def recompute_steps(t: int, b: int, hid: int, pixels: int, dtype: torch.dtype) -> int:
    """Steps per chunk where the gates are recomputed (``keep_gates`` False), in the training
    forward and the backward alike.

    Args:
        t, b, hid, pixels: steps, batch, hidden channels, and pixels per frame (the product
            of its spatial sizes).
        dtype: the input's dtype.

    Returns:
        :func:`steps_per_chunk`'s, but at most ceil(t / RECOMPUTE_FRACTION), and at least 1.
    """
    return max(1, min(steps_per_chunk(t, b, hid, pixels, dtype), -(-t // RECOMPUTE_FRACTION)))


def _recompute_gates(gate_forward, zx, h_prev, w_h, gate_bias, c_prev, peephole, spec, gdt,
                     h_scratch, c_scratch, steps, step):
    """One step's saved gates again, by the forward's own code (so the same values): from zx
    (the step's input-convolution output, overwritten with them when the dtypes agree)."""
    zh = None if h_prev is None else spec.conv(steps.recurrent(h_prev), w_h)
    z = zx if gdt == zx.dtype else torch.empty_like(zx, dtype=gdt)
    gate_forward(zx, zh, gate_bias, c_prev, peephole, h_out=h_scratch, c_out=c_scratch,
                 z_out=z, save_z=True, **steps.at(step))
    return z


def cat_convs(spec: LayerSpec, x: Tensor) -> bool:
    """Whether the forward convolves [x_t, h_{t-1}] per step with the combined weight instead of
    x over all steps at once plus h per step. On CPU (oneDNN) the cat form ran faster and needs
    no add of the two results (bench/bench_convs.py, one thread, cpu-m fp32: forward 1.2-1.5x);
    on CUDA the split form won at M (issue 4: 0.94 vs 1.04 ms for 16 steps).

    Args:
        spec: the layer's :class:`LayerSpec` (its backend is read).
        x: (T, B, C, H, W) input (its device is read).

    Returns:
        True for the torch backend on CPU.
    """
    return spec.backend == "torch" and x.device.type == "cpu"


def _layer_forward_cat(x, weight, bias, peephole, h0, c0, spec: LayerSpec, save: bool, steps):
    """:func:`layer_forward` with one convolution of [x_t, h_{t-1}] per step (see cat_convs).
    Saves the same tensors, so the backward is shared. Each x_t is read where it is (the
    concatenation and the C step copy it anyway): a batch-first input is not first copied into
    the sequence layout (B4 T8 C4 32x32: ~0.2 ms of a 4.4 ms forward)."""
    t, _, cin, *_ = x.shape
    save_z = save and spec.keep_gates
    h_seq, c_last, c_seq, z_seq = output_buffers(x, weight, save, spec.backend,
                                                 keep_gates=spec.keep_gates)
    w_all = None  # the weight in the frames' layout, for torch's convolution (made once)
    fused = spec._native()  # small frames: the whole step in one C call (native_step)
    pixel_major = frames_channels_last(x.device, x.dim() - 3)
    c_prev, h_prev = _initial_cell(c_last, c0), h0
    start = 0  # the leading steps without masks, run by native_step in one loop of C calls
    if fused and steps.mask is None:
        start = native_step.steps_into(
            x, min(t, steps.unmasked), h0, c_prev, weight, bias, peephole, spec.dilation,
            h_seq=h_seq, c_seq=c_seq, c_last=c_last, z_seq=z_seq if save_z else None,
            save=save, pixel_major=pixel_major)
        if start:
            c_prev = c_seq[start - 1] if save and start < t else c_last
            h_prev = h_seq[start - 1]
    for step in range(start, t):
        x_t = x[step]
        h_in = None
        if h_prev is not None:  # (else the zero state: step 0 without h0)
            h_in = steps.recurrent(h_prev)
            # (no no-op .to(): on CPU each call of this loop is a visible part of a step)
            h_in = h_in if h_in.dtype == x_t.dtype else h_in.to(x_t.dtype)
        c_out = c_seq[step] if save and step < t - 1 else c_last
        h_out = h_seq[step]
        z_out = z_seq[step] if save_z else None
        masks = steps.at(step)
        if fused and native_step.step_into(
                x_t, h_in, c_prev, weight if h_in is not None else weight[:, :cin], bias,
                peephole, spec.dilation, h_out=h_out, c_out=c_out, gates=z_out,
                valid=masks.get("valid"), pixel_major=pixel_major):
            c_prev, h_prev = c_out, h_out
            continue
        fused = False  # (a step it declines, the next ones would be declined too)
        if h_in is None:
            z = spec.conv(x_t, conv_layout(weight[:, :cin]), bias)
        else:
            w_all = conv_layout(weight) if w_all is None else w_all
            z = spec.conv(x_t, w_all, bias, h=h_in)
        gate_forward_torch(z, None, None, c_prev, peephole, h_out=h_out, c_out=c_out,
                           z_out=z_out, save_z=save_z, **masks)
        c_prev, h_prev = c_out, h_out
    return h_seq, c_last, c_seq, z_seq


def _fused_fits(x: Tensor, weight: Tensor) -> bool:
    """Whether the fused step serves these images and this weight (its in-image and weight
    offsets are int32); larger ones take the split path."""
    _, _, cin, *spatial = x.shape
    return (len(spatial) == 2 and max(cin, weight.shape[0]) * math.prod(spatial) < 2**31
            and weight.numel() < 2**31)


def _layer_forward_fused(x, weight, bias, peephole, h0, c0, spec: LayerSpec, save: bool,
                         frames, config=None):
    """:func:`layer_forward` with one fused kernel per step (see LayerSpec.fused): no input
    convolution over all steps, no pre-activations in memory but the saved ones. Saves the same
    tensors, so the backward is shared. ``config``: fused_step's tile override (tuning)."""
    from .kernels.fused_step import fused_step, pack_weight

    t, b, cin, *_ = x.shape
    save_z = save and spec.keep_gates
    h_seq, c_last, c_seq, z_seq = output_buffers(x, weight, save, spec.backend,
                                                 keep_gates=spec.keep_gates)
    w_packed = pack_weight(weight, cin)
    c_prev, h_prev = _initial_cell(c_last, c0), h0
    for step in range(t):
        c_out = c_seq[step] if save and step < t - 1 else c_last
        fused_step(frames[step * b : (step + 1) * b], h_prev, w_packed, bias, c_prev, peephole,
                   h_out=h_seq[step], c_out=c_out, z_out=z_seq[step] if save_z else None,
                   kernel=tuple(weight.shape[2:]), dilation=spec.dilation, config=config)
        c_prev, h_prev = c_out, h_seq[step]
    return h_seq, c_last, c_seq, z_seq


class _Sum:
    """A float32 (or float64) running sum of per-chunk gradients."""

    def __init__(self, dtype):
        self.dtype, self.value = dtype, None

    def add(self, t: Tensor | None) -> None:
        if t is not None:
            t = t.to(self.dtype)
            self.value = t if self.value is None else self.value + t


def layer_backward(
    grad_h_seq: Tensor | None, grad_c_last: Tensor | None, x: Tensor, weight: Tensor,
    peephole: Tensor | None, h0: Tensor | None, c0: Tensor | None, h_seq: Tensor,
    c_last: Tensor, c_seq: Tensor, z_seq: Tensor, spec: LayerSpec, needs: tuple[bool, ...],
    consume: bool = False, bias: Tensor | None = None, lengths: Tensor | None = None,
    recurrent_mask: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None,
           Tensor | None]:
    """Gradients of :func:`layer_forward`: the backward time loop.

    Per step (last first) the gate gradient and the hidden input-gradient convolution; the
    input gradient and every weight/bias gradient once per chunk of steps. Where the gates were
    not kept (``spec.keep_gates`` False) they are recomputed chunk by chunk, by the forward's
    own code, from x, h_seq and the cells.

    Args:
        grad_h_seq: (T, B, hid, H, W) gradient w.r.t. h_seq, or None (zeros); not written.
        grad_c_last: (B, hid, H, W) gradient w.r.t. c_last, or None (zeros); not written.
        x, weight, peephole, h0, c0: the forward's inputs, as in :func:`layer_forward`.
        h_seq, c_last, c_seq, z_seq: the forward's outputs, run with ``save``.
        spec: the forward's :class:`LayerSpec`.
        needs: six bools, which of (x, weight, bias, peephole, h0, c0) want a gradient; the
            others are not computed.
        consume: overwrite z_seq with the gate gradients (when the gates were kept and z_seq's
            dtype is the input's) instead of writing them to a new buffer; z_seq is garbage
            afterwards, so a second backward over the same forward needs the forward run again.
        bias: (4*hid,) or None; read only to recompute the gates (``spec.keep_gates`` False).
        lengths, recurrent_mask: the forward's (see :func:`layer_forward`). Past a sample's
            end its gate gradients are zero (so its inputs there get none), and its cell's
            gradient passes through unchanged; the mask scales h's recurrent gradient and
            the h the hidden weight's gradient reads.

    Returns:
        (dx, dweight, dbias, dpeephole, dh0, dc0), None where not needed (and for peephole, h0
        and c0 where that input is None): dx (T, B, C, H, W) in x's dtype, dweight shaped
        and typed as weight, dbias (4*hid,) in weight's dtype, the others shaped and typed as
        their inputs.
    """
    gate_forward, gate_backward = gate_launchers(spec.backend)
    steps = _Steps(lengths, recurrent_mask, spec.backend, x)
    grad_h_seq = steps.output_grad(grad_h_seq)
    need_x, need_w, need_b, need_p, need_h0, need_c0 = needs
    t, b, cin, *spatial = x.shape
    pixels = math.prod(spatial)
    sdt = c_last.dtype
    w_x, w_h = _split(weight, cin)
    hid = w_h.shape[1]
    recompute = not spec.keep_gates
    frames = seq_frames(x) if need_w or recompute else None
    if recompute:  # the gates are recomputed per chunk, in the chunk's buffer, then its dz
        chunk, dz_buf = recompute_steps(t, b, hid, pixels, x.dtype), None
        conv_bias, gate_bias = (bias, None) if spec.backend == "torch" else (None, bias)
        gdt = saved_gates_dtype(x.dtype, spec.backend)
        h_scratch, c_scratch = torch.empty_like(h_seq[:1]), torch.empty_like(c_last)
    elif consume and z_seq.dtype == x.dtype:
        chunk, dz_buf = t, z_seq  # each step's gradients replace its gates, once read
    else:  # the gradients fed to the convolutions, in chunks of steps
        chunk = steps_per_chunk(t, b, hid, pixels, x.dtype)
        dz_buf = torch.empty_like(z_seq[:chunk], dtype=x.dtype)
    dc = torch.empty_like(c_last)
    if grad_c_last is None:
        dc.zero_()
    else:
        dc.copy_(grad_c_last)
    c_zero = torch.zeros_like(c_last) if c0 is None else None
    dpeep, dw_x, dw_h, dbias = _Sum(sdt), _Sum(sdt), _Sum(sdt), _Sum(sdt)
    # The kernels sum the bias gradient as they go (no pass over dz); torch sums dz per chunk.
    db_acc = None
    if need_b and spec.backend == "triton" and t > 0:
        from .kernels.gates import bias_grad_accumulator

        gates_like = empty_seq(1, b, 4 * hid, *spatial, dtype=x.dtype, device="meta",
                               layout_of=x.device)[0]
        db_acc = bias_grad_accumulator(gates_like, device=x.device)
    dx_chunks = []
    dh_rec = None
    for t1 in range(t, 0, -chunk):
        t0 = max(0, t1 - chunk)
        if recompute:
            dz = spec.conv(frames[t0 * b : t1 * b], w_x, conv_bias)
            dz = dz.unflatten(0, (t1 - t0, b))
        else:
            dz = dz_buf[t0:t1] if dz_buf is z_seq else dz_buf[: t1 - t0]
        for step in reversed(range(t0, t1)):
            c_t = c_last if step == t - 1 else c_seq[step]
            c_prev = (c0 if c0 is not None else c_zero) if step == 0 else c_seq[step - 1]
            dh_out = steps.step_grad(grad_h_seq, step, c_t)
            z = z_seq[step] if not recompute else _recompute_gates(
                gate_forward, dz[step - t0], h0 if step == 0 else h_seq[step - 1], w_h,
                gate_bias, c_prev, peephole, spec, gdt, h_scratch[0], c_scratch, steps, step)
            _, _, dp = gate_backward(
                z, c_prev, c_t, peephole, dh_out, dh_rec, dc,
                dz_out=dz[step - t0], dc_prev_out=dc, dbias_acc=db_acc, **steps.at(step),
            )
            dpeep.add(dp)
            if step > 0 or (need_h0 and h0 is not None):
                dh_rec = spec.conv_input_grad(dz[step - t0], (b, hid, *spatial), w_h)
                if recurrent_mask is not None:
                    dh_rec.mul_(recurrent_mask)
        # This chunk's share of the batched gradients, before dz_buf is reused.
        dz_frames = dz.flatten(0, 1)
        if need_x:
            dx = spec.conv_input_grad(dz_frames, ((t1 - t0) * b, cin, *spatial), w_x)
            dx_chunks.append(dx.unflatten(0, (t1 - t0, b)))
        if need_w:
            dw_x.add(spec.conv_weight_grad(dz_frames, frames[t0 * b : t1 * b], w_x))
            s0 = max(t0, 1)  # steps s0..t1-1 read h_{t-1} from h_seq; step 0 reads h0
            if t1 > s0:
                h_read = steps.recurrent(h_seq[s0 - 1 : t1 - 1])
                dw_h.add(spec.conv_weight_grad(dz[s0 - t0 :].flatten(0, 1),
                                               h_read.flatten(0, 1), w_h))
            if t0 == 0 and h0 is not None:
                h0_cl = conv_layout(steps.recurrent(h0))
                dw_h.add(spec.conv_weight_grad(dz[0], h0_cl, w_h))
        if need_b and db_acc is None:
            dbias.add(dz.sum(dim=(0, 1, *range(3, dz.dim())), dtype=sdt))

    dx = dweight = None
    if need_x:
        dx = dx_chunks[0] if len(dx_chunks) == 1 else torch.cat(dx_chunks[::-1])
    if need_w:
        dweight = torch.empty_like(weight)
        dweight[:, :cin] = dw_x.value
        dweight[:, cin:] = 0 if dw_h.value is None else dw_h.value
    if db_acc is not None:
        dbias.add(db_acc.sum(0))
    dbias = dbias.value.to(weight.dtype) if need_b else None
    dh0 = dh_rec.to(h0.dtype) if need_h0 and h0 is not None else None
    dc0 = dc.to(c0.dtype) if need_c0 and c0 is not None else None
    dpeep = dpeep.value.to(peephole.dtype) if need_p and peephole is not None else None
    return dx, dweight, dbias, dpeep, dh0, dc0
