"""The ConvLSTM gate/state math in plain torch.

This is the one place the equations are written for the package: the CPU path runs it and the
Triton kernels are checked against it. The tests keep their own float64 oracle so that a mistake
here cannot hide a mistake in the kernels.

Gate order along the channel axis of the pre-activations ``z`` is i, f, o, g (as in the popular
ConvLSTM). With peepholes ``p`` of shape (3, hidden) (Shi et al. 2015, eq. 3)::

    i = σ(z_i + p_0∘c_prev)      f = σ(z_f + p_1∘c_prev)      g = tanh(z_g)
    c = f∘c_prev + i∘g
    o = σ(z_o + p_2∘c)                                         # the NEW cell
    h = o∘tanh(c)
"""

from __future__ import annotations

import torch
from torch import Tensor


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the cell state is kept in (and the gate math done in) for inputs of ``dtype``.

    Args:
        dtype: the inputs' dtype.

    Returns:
        ``torch.float64`` for float64 inputs, else ``torch.float32``.

    >>> state_dtype(torch.bfloat16), state_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def preactivation_ref(zx: Tensor, zh: Tensor | None = None, bias: Tensor | None = None, *,
                      out: Tensor | None = None) -> Tensor:
    """z = zx + zh + bias, summed in the state dtype (as the kernels sum in fp32).

    Args:
        zx: (B, 4*hidden, H, W), any float dtype: the input convolution's pre-activations
            (gates i, f, o, g along channels).
        zh: (B, 4*hidden, H, W), any float dtype: the hidden convolution's, or None.
        bias: (4*hidden,) or None.
        out: None for a new, differentiable tensor; else a (B, 4*hidden, H, W) state-dtype
            buffer the sum is written into (not differentiable).

    Returns:
        z (B, 4*hidden, H, W) in ``state_dtype(zx.dtype)``: out, or a new tensor. Where zx
        already is in the state dtype and nothing is added, zx itself comes back (out left
        alone).
    """
    math = state_dtype(zx.dtype)
    if zx.dtype == math:  # (no no-op .to(): a dispatch a step on CPU)
        z = zx
    else:
        z = zx.to(math) if out is None else out.copy_(zx)
    if zh is None and bias is None:
        return z
    terms = (None if zh is None else zh.to(math),
             None if bias is None else _per_channel(bias.to(math), zx.dim()))
    for term in terms:
        if term is not None:
            z = z + term if out is None else torch.add(z, term, out=out)
    return z


def _per_channel(v: Tensor, dim: int) -> Tensor:
    """(C,) or (K, C) -> broadcastable over (B, C, *spatial) of ``dim`` dims: a trailing 1 per
    spatial dim (1 to 3 of them)."""
    return v.view(*v.shape, *([1] * (dim - 2)))


def _spatial_sum(t: Tensor) -> Tensor:
    """(B, C, *spatial) summed to (C,)."""
    return t.sum((0, *range(2, t.dim())))


def _peephole_terms(peephole: Tensor | None, dtype: torch.dtype, dim: int):
    """(3, hidden) -> (3, 1, hidden, 1...) for states of ``dim`` dims, or None."""
    if peephole is None:
        return None
    return _per_channel(peephole.to(dtype), dim).unsqueeze(1)


def gate_forward_ref(
    z: Tensor, c_prev: Tensor, peephole: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One gate/state update in functional torch (differentiable, traceable by torch.compile).

    Args:
        z: (B, 4*hidden, H, W) pre-activations i, f, o, g, bias included, any float dtype.
        c_prev: (B, hidden, H, W) cell state in ``state_dtype(z.dtype)``.
        peephole: (3, hidden) (rows i, f, o) or None.

    Returns:
        (h, c): h (B, hidden, H, W) in z's dtype, c (B, hidden, H, W) in the state dtype.

    >>> z, c_prev = torch.zeros(1, 8, 2, 2), torch.ones(1, 2, 2, 2)
    >>> h, c = gate_forward_ref(z, c_prev)
    >>> c[0, 0, 0, 0].item()  # f = 0.5 keeps half the cell; g = tanh(0) adds nothing
    0.5
    """
    i, f, o, g, c = _activations(z, c_prev, None, peephole, forward=True)
    h = o * torch.tanh(c)
    return (h if h.dtype == z.dtype else h.to(z.dtype)), c


def _activations(z, c_prev, c, peephole, forward=False):
    """i, f, o, g (state dtype); in the forward also the new cell, which o's peephole reads."""
    # Casts and slices only where needed: on CPU a one-frame step at small sizes is mostly
    # per-op overhead (each no-op .to() or unused slice is a dispatch).
    math = state_dtype(z.dtype)
    hid = z.shape[1] // 4
    z = z if z.dtype == math else z.to(math)
    c_prev = c_prev if c_prev.dtype == math else c_prev.to(math)
    p = _peephole_terms(peephole, math, z.dim())
    if p is None:
        i, f, o = torch.sigmoid(z[:, : 3 * hid]).chunk(3, dim=1)  # i, f, o are adjacent
    else:
        i = torch.sigmoid(z[:, :hid] + p[0] * c_prev)
        f = torch.sigmoid(z[:, hid : 2 * hid] + p[1] * c_prev)
    g = torch.tanh(z[:, 3 * hid :])
    if forward:
        c = torch.addcmul(f * c_prev, i, g)
    if p is not None:
        o = torch.sigmoid(z[:, 2 * hid : 3 * hid] + p[2] * c.to(math))
    return (i, f, o, g, c) if forward else (i, f, o, g)


def gate_activations_ref(z: Tensor, c_prev: Tensor, c: Tensor, peephole: Tensor | None) -> Tensor:
    """The activated gates recomputed from pre-activations and cells.

    Args:
        z: (B, 4*hidden, H, W) pre-activations i, f, o, g, bias included, any float dtype.
        c_prev: (B, hidden, H, W) the step's previous cell.
        c: (B, hidden, H, W) the step's new cell (read only with peepholes: o's reads it).
        peephole: (3, hidden) or None.

    Returns:
        (B, 4*hidden, H, W) activated i, f, o, g in ``state_dtype(z.dtype)``.
    """
    return torch.cat(_activations(z, c_prev, c, peephole), dim=1)


# ---- in place, for the CPU time loop ------------------------------------------------------------
# The same equations as above, written through preallocated buffers: on CPU the gate math is
# memory-bound elementwise work, and every temporary and copy is another pass over memory. Not
# differentiable (the sequence op supplies its own backward) and not traced by dynamo.


def step_valid(lengths: Tensor | None, step: int | Tensor, dim: int,
               dtype: torch.dtype) -> Tensor | None:
    """Which samples a step is inside of, as a multiplier: (B, 1, ...) of ``dim`` dims in
    ``dtype``, 1 where ``step`` < lengths[b], else 0 (past sample b's end); None without
    lengths. ``step`` may be a (T, 1) tensor of steps: then (T, B, 1, ...) of ``dim`` + 1
    dims, one multiplier per step. Computed on lengths' device (no host read)."""
    if lengths is None:
        return None
    valid = (lengths > step).to(dtype)
    return valid.view(*valid.shape, *([1] * (dim - valid.dim())))


# Below this many hidden channels (and without peepholes), one sigmoid and one tanh run over all
# 4*hidden channels, the unused gates' results wasted, rather than over slices: on
# channels-last frames a slice is a strided run of hidden values per pixel, which torch's CPU
# sigmoid and tanh take ~2-5x slower per element than dense memory (one thread, whole update:
# B2 hid16 16x16 138 -> 83 us with the sigmoid dense, -> 58 us with the tanh too; at hid32
# 24x24 and hid64 32x32 the slices win, 385 vs 431 and 2637 vs 3002 us).
DENSE_SIGMOID_BELOW = 32


def gate_forward_inplace_ref(gates: Tensor, c_prev: Tensor, peephole: Tensor | None, *,
                             h_out: Tensor, c_out: Tensor, pre: Tensor | None = None,
                             valid: Tensor | None = None, keep_g: bool = True) -> None:
    """:func:`gate_forward_ref` in place, through the caller's buffers.

    Args:
        gates: (B, 4*hidden, H, W), state dtype: holds the pre-activations (unless ``pre``
            does) and is overwritten with the activated i, f, o, g.
        c_prev: (B, hidden, H, W), state dtype.
        peephole: (3, hidden) or None.
        h_out: (B, hidden, H, W), state dtype: where h goes.
        c_out: (B, hidden, H, W), state dtype: where c goes (may be c_prev itself).
        pre: (B, 4*hidden, H, W) like gates, holding the pre-activations instead, or None.
            Reading from it costs no extra pass: each activation writes its slot of ``gates``
            directly.
        valid: :func:`step_valid`'s multiplier, or None. A sample past its end takes the step
            with the input and output gates shut and the forget gate open (written so into
            ``gates``): c = c_prev exactly, h = 0, and the backward from these gates gives it
            dz = 0 and dc_prev = dc.
        keep_g: leave tanh(z_g) in g's slot of ``gates`` (the backward reads it); False when
            nobody reads the gates afterwards (inference), which may save a copy.
    """
    hid = gates.shape[1] // 4
    src = gates if pre is None else pre
    # The four gates' views in one call (on CPU each view is a dispatch, per step).
    i, f, o, g = gates.chunk(4, dim=1)
    p = _peephole_terms(peephole, gates.dtype, gates.dim())
    dense = p is None and hid < DENSE_SIGMOID_BELOW and gates.device.type == "cpu"
    if dense:
        # tanh over all 4*hidden channels too, g's slot kept: torch's CPU tanh and sigmoid
        # take a strided channel slice ~5x slower per element than dense memory, so two dense
        # passes beat a slice's (B2 hid16 16x16, one thread: 71 -> 58 us the update). Before
        # the sigmoid, which may overwrite src.
        tanh_g = torch.tanh(src).narrow(1, 3 * hid, hid)
        torch.sigmoid(src, out=gates)
        if keep_g:
            g.copy_(tanh_g)
        g = tanh_g
    elif p is None:
        torch.sigmoid(src[:, : 3 * hid], out=gates[:, : 3 * hid])
        torch.tanh(src.narrow(1, 3 * hid, hid), out=g)
    else:
        zi, zf, zo, zg = src.chunk(4, dim=1)
        torch.addcmul(zi, p[0], c_prev, out=i).sigmoid_()
        torch.addcmul(zf, p[1], c_prev, out=f).sigmoid_()
        torch.tanh(zg, out=g)  # (src may be gates: zg is read before g's slot is written)
    if valid is not None:  # i, f (and o, activated already without peepholes) shut, f opened
        gates[:, : (2 if p is not None else 3) * hid].mul_(valid)
        f.add_(1 - valid)  # f + 0 stays f exactly
    c = torch.mul(f, c_prev, out=c_out).addcmul_(i, g)
    if p is not None:
        torch.addcmul(zo, p[2], c, out=o).sigmoid_()
        if valid is not None:
            o.mul_(valid)
    torch.mul(o, torch.tanh(c), out=h_out)


def gate_backward_from_gates_ref(
    gates: Tensor,
    c_prev: Tensor,
    c: Tensor,
    peephole: Tensor | None,
    dh: Tensor | None,
    dc: Tensor | None,
    *,
    dz_out: Tensor | None = None,
    dc_prev_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`gate_forward_ref` given its activated gates. Written with the fused
    sigmoid/tanh derivative kernels, in place.

    Args:
        gates: (B, 4*hidden, H, W) activated i, f, o, g; their dtype is the math's.
        c_prev: (B, hidden, H, W) the step's previous cell.
        c: (B, hidden, H, W) the step's new cell.
        peephole: (3, hidden) or None.
        dh: (B, hidden, H, W) gradient w.r.t. h, or None (zeros).
        dc: (B, hidden, H, W) gradient w.r.t. c, or None.
        dz_out: (B, 4*hidden, H, W) where dz goes, or None. May be ``gates`` itself (the
            sequence backward overwrites the saved gates with their gradients): every gate is
            read before its slot is written.
        dc_prev_out: (B, hidden, H, W) where dc_prev goes (may be dc itself), or None.

    Returns:
        (dz, dc_prev, dpeephole): dz (B, 4*hidden, H, W) (dz_out when given), dc_prev
        (B, hidden, H, W) (dc_prev_out when given) and the peephole gradient (3, hidden) (None
        without peepholes), all in the gates' dtype unless the buffers say otherwise.
    """
    math = gates.dtype
    hid = gates.shape[1] // 4
    i, f, o, g = gates.unflatten(1, (4, hid)).unbind(1)
    c_prev, c = c_prev.to(math), c.to(math)
    p = _peephole_terms(peephole, math, gates.dim())
    tc = torch.tanh(c)
    dh = torch.zeros_like(c) if dh is None else dh.to(math)

    dz = dz_out if dz_out is not None and dz_out.dtype == math else torch.empty_like(gates)
    # The gradients before the activation derivatives go to ``pre``: dz itself, unless dz is
    # the gates' own memory, which must stay readable until the derivatives are taken.
    pre = torch.empty_like(gates) if dz.data_ptr() == gates.data_ptr() else dz
    pre_i, pre_f, pre_o, pre_g = pre.unflatten(1, (4, hid)).unbind(1)
    dzi, dzf, dzo, dzg = dz.unflatten(1, (4, hid)).unbind(1)
    torch.mul(dh, tc, out=pre_o)
    # dc_total = dc + dh*o*(1 - tanh(c)^2) (+ dzo*p_o): the gradient reaching c this step.
    dct = torch.mul(dh, o)
    torch.ops.aten.tanh_backward.grad_input(dct, tc, grad_input=dct)
    if dc is not None:
        dct += dc
    if p is not None:
        torch.ops.aten.sigmoid_backward.grad_input(pre_o, o, grad_input=dzo)
        dct.addcmul_(dzo, p[2])
    torch.mul(dct, g, out=pre_i)
    torch.mul(dct, c_prev, out=pre_f)
    torch.mul(dct, i, out=pre_g)
    dc_prev = torch.mul(dct, f, out=dc_prev_out) if dc_prev_out is not None else dct * f
    # i, f and o are adjacent: one fused d*s*(1-s) over the three (o done above with peepholes).
    n_sig = 2 * hid if p is not None else 3 * hid
    torch.ops.aten.sigmoid_backward.grad_input(pre[:, :n_sig], gates[:, :n_sig],
                                               grad_input=dz[:, :n_sig])
    torch.ops.aten.tanh_backward.grad_input(pre_g, g, grad_input=dzg)
    dpeep = None
    if p is not None:
        dc_prev.addcmul_(dzi, p[0]).addcmul_(dzf, p[1])
        dpeep = torch.stack(
            [_spatial_sum(dzi * c_prev), _spatial_sum(dzf * c_prev), _spatial_sum(dzo * c)]
        )
    if dz_out is not None and dz is not dz_out:
        dz = dz_out.copy_(dz)
    return dz, dc_prev, dpeep


def gate_backward_ref(
    z: Tensor,
    c_prev: Tensor,
    c: Tensor,
    peephole: Tensor | None,
    dh: Tensor | None,
    dc: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of :func:`gate_forward_ref`, recomputing the gates from the saved ``z`` and cells.

    Args:
        z: (B, 4*hidden, H, W) the forward's pre-activations, any float dtype.
        c_prev: (B, hidden, H, W) the forward's previous cell.
        c: (B, hidden, H, W) the cell the forward returned.
        peephole: (3, hidden) or None.
        dh: (B, hidden, H, W) gradient w.r.t. h, or None.
        dc: (B, hidden, H, W) gradient w.r.t. c, or None.

    Returns:
        (dz, dc_prev, dpeephole): dz (B, 4*hidden, H, W) in z's dtype, dc_prev (B, hidden, H, W)
        in the state dtype and the peephole gradient (3, hidden) in the state dtype (None
        without peepholes).
    """
    gates = gate_activations_ref(z, c_prev, c, peephole)
    dz, dc_prev, dpeep = gate_backward_from_gates_ref(gates, c_prev, c, peephole, dh, dc)
    return dz.to(z.dtype), dc_prev, dpeep
