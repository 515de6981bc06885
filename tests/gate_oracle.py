"""The ConvLSTM gate equations in float64, written here (nothing from the package): the oracle
of the Triton gate kernels (tests/kernels/test_gates.py) and of the CPU C kernels
(tests/lib/test_native_gates.py). Its backward is torch.autograd through its forward, so no
hand-derived gradient is trusted."""

import torch

F64 = torch.float64


def _sigmoid(x):
    return 1 / (1 + torch.exp(-x))  # exp overflows to inf for very negative x: the result is 0


def per_channel(v, like):
    """A per-channel vector v (C,) or rows (K, C) shaped to broadcast against like (B, C, ...)."""
    return v.reshape(*v.shape[:-1], v.shape[-1], *(1,) * (like.dim() - 2))


def oracle_forward(z, c_prev, peephole=None):
    """z: (B, 4*hid, *spatial) pre-activations (i, f, o, g); returns h, c (Shi et al. 2015
    eq. 3)."""
    zi, zf, zo, zg = z.chunk(4, dim=1)
    if peephole is not None:
        p = per_channel(peephole, c_prev)[:, None]
        zi, zf = zi + p[0] * c_prev, zf + p[1] * c_prev
    c = _sigmoid(zf) * c_prev + _sigmoid(zi) * torch.tanh(zg)
    if peephole is not None:
        zo = zo + p[2] * c  # the output gate reads the new cell
    return _sigmoid(zo) * torch.tanh(c), c


def oracle_backward(z, c_prev, peephole, dh, dc, dtype=F64):
    """(dz, dc_prev, dpeephole) by autograd through oracle_forward, run in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None
              for t in (z, c_prev, peephole)]  # fmt: skip
    h, c = oracle_forward(*leaves)
    loss = (h * dh.to(dtype)).sum() + (c * dc.to(dtype)).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return grads[0], grads[1], (grads[2] if peephole is not None else None)
