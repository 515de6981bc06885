"""A float64 oracle for ConvLSTM, written from the equations.

Deliberately independent of the package (nothing is imported from ``triton_convlstm``): a plain
loop over layers and time of cat -> conv -> split -> gates, with

* "same" padding for odd and even kernels through ``F.pad`` (left = total // 2,
  right = total - left, where total = dilation * (k - 1)), in any of nn.Conv2d's padding modes,
* dilation,
* optional peepholes (Shi et al. 2015): i = σ(z_i + w_ci∘c_prev), f = σ(z_f + w_cf∘c_prev),
  c = f∘c_prev + i∘tanh(z_g), o = σ(z_o + w_co∘c) (the NEW cell), h = o∘tanh(c),
* an optional initial state per layer.

Gate order along the conv output channels is i, f, o, g; the conv input is cat([x_t, h_prev]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class LayerParams:
    weight: Tensor  # (4*hidden, in + hidden, kh, kw)
    bias: Tensor | None  # (4*hidden,)
    peephole: Tensor | None  # (3, hidden)
    dilation: tuple[int, ...]
    padding_mode: str = "zeros"  # as nn.Conv2d's: zeros, reflect, replicate, circular

    @property
    def hidden(self) -> int:
        return self.weight.shape[0] // 4

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.weight, self.bias, self.peephole) if t is not None]


def _pair(v, n: int = 2) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(a) for a in v)


def params_from_module(module, num_layers: int, dilation=1, dtype=torch.float64,
                       requires_grad: bool = True, prefix: str = "cell_list",
                       spatial_dims: int = 2) -> list[LayerParams]:
    """Detached copies (in ``dtype``) of the parameters of a ConvLSTM, read through the
    state_dict keys of the popular module: cell_list.{l}.conv.weight/bias, cell_list.{l}.peephole
    (``prefix="cell_list_reverse"`` for a bidirectional model's reverse cells).

    ``dilation``: one value or a list per layer (an int or a tuple each); the test knows
    what it constructed, so it is passed in rather than read from the module.
    """
    sd = module.state_dict()
    dil = dilation if isinstance(dilation, list) else [dilation] * num_layers
    out = []
    for layer in range(num_layers):
        def get(key, layer=layer):
            t = sd.get(f"{prefix}.{layer}.{key}")
            if t is None:
                return None
            return t.detach().to(dtype).clone().requires_grad_(requires_grad)

        out.append(LayerParams(get("conv.weight"), get("conv.bias"), get("peephole"),
                               _pair(dil[layer], spatial_dims)))
    return out


def params_from_cell(cell, dilation=1, dtype=torch.float64, requires_grad=True) -> LayerParams:
    def cp(t):
        return None if t is None else t.detach().to(dtype).clone().requires_grad_(requires_grad)

    return LayerParams(cp(cell.conv.weight), cp(getattr(cell.conv, "bias", None)),
                       cp(getattr(cell, "peephole", None)), _pair(dilation))


def conv_same(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: tuple[int, ...],
              padding_mode: str = "zeros") -> Tensor:
    """'same' convolution in 1, 2 or 3 spatial dims: total d*(k-1) per dim, the extra pixel at
    the end, through F.pad (last dim first) and an unpadded F.conv{n}d."""
    pads = []
    for k, d in zip(reversed(weight.shape[2:]), reversed(dilation)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    mode = "constant" if padding_mode == "zeros" else padding_mode
    x = F.pad(x, pads, mode=mode)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
    return conv(x, weight, bias, dilation=dilation)


def cell_step(x: Tensor, h: Tensor, c: Tensor, p: LayerParams,
              state_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """One step. Math in x's dtype, or the cell update in ``state_dtype`` when given."""
    z = conv_same(torch.cat([x, h], dim=1), p.weight, p.bias, p.dilation, p.padding_mode)
    sd = state_dtype or z.dtype
    zi, zf, zo, zg = torch.split(z.to(sd), p.hidden, dim=1)
    c = c.to(sd)
    if p.peephole is not None:
        w = p.peephole.to(sd).view(3, 1, p.hidden, *([1] * (x.dim() - 2)))
        zi = zi + w[0] * c
        zf = zf + w[1] * c
    i = torch.sigmoid(zi)
    f = torch.sigmoid(zf)
    g = torch.tanh(zg)
    c_new = f * c + i * g
    if p.peephole is not None:
        zo = zo + w[2] * c_new
    o = torch.sigmoid(zo)
    h_new = o * torch.tanh(c_new)
    return h_new.to(x.dtype), c_new


def _direction(seq: Tensor, p: LayerParams, h, c, state_dtype, steps) -> tuple:
    """One direction over (B, T, C, *spatial) in the order ``steps``: (outputs in time order,
    (h, c) after the last step taken)."""
    b, _, _, *spatial = seq.shape
    if h is None:
        h = seq.new_zeros(b, p.hidden, *spatial)
        c = seq.new_zeros(b, p.hidden, *spatial, dtype=state_dtype or seq.dtype)
    outs = {}
    for step in steps:
        h, c = cell_step(seq[:, step], h, c, p, state_dtype)
        outs[step] = h
    return torch.stack([outs[t] for t in sorted(outs)], dim=1), (h, c)


def _halves(v: Tensor | None, hid: int):
    return (None, None) if v is None else (v[:, :hid], v[:, hid:])


def convlstm(x: Tensor, layers: list[LayerParams], hidden_state=None, batch_first: bool = True,
             state_dtype: torch.dtype | None = None, reverse: list[LayerParams] | None = None):
    """Returns (outputs per layer, each (B, T, hidden, *spatial); [(h, c)] per layer), for 1, 2
    or 3 spatial dims. ``reverse``: the reverse cells' parameters of a bidirectional model (each
    layer's output and state concatenate the forward and the reverse direction's along
    channels; the reverse one reads t = T-1 down to 0, its final state is after x[0])."""
    if not batch_first:
        x = x.transpose(0, 1)
    t = x.shape[1]
    seq = x
    outputs, states = [], []
    for li, p in enumerate(layers):
        h, c = (None, None) if hidden_state is None else hidden_state[li]
        if reverse is None:
            seq, (h, c) = _direction(seq, p, h, c, state_dtype, range(t))
        else:
            (hf, hr), (cf, cr) = _halves(h, p.hidden), _halves(c, p.hidden)
            fwd, (hf, cf) = _direction(seq, p, hf, cf, state_dtype, range(t))
            rev, (hr, cr) = _direction(seq, reverse[li], hr, cr, state_dtype, reversed(range(t)))
            seq = torch.cat([fwd, rev], dim=2)
            h, c = torch.cat([hf, hr], dim=1), torch.cat([cf, cr], dim=1)
        outputs.append(seq)
        states.append((h, c))
    return outputs, states


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Norm-wise relative error ||actual - expected|| / ||expected|| in float64.

    NaN/inf never pass: a non-finite ``actual`` gives inf.
    """
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        return float("inf")
    den = e.norm().item()
    num = (a - e).norm().item()
    if den == 0.0:
        return num
    return num / den
