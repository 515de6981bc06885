"""A float64 oracle for ConvLSTM, written from the equations.

Deliberately independent of the package (nothing is imported from ``triton_convlstm``): a plain
loop over layers and time of cat -> conv -> split -> gates, with

* "same" padding for odd and even kernels through ``F.pad`` (left = total // 2,
  right = total - left, where total = dilation * (k - 1)), in any of nn.Conv2d's padding modes,
* dilation,
* optional peepholes (Shi et al. 2015): i = σ(z_i + w_ci∘c_prev), f = σ(z_f + w_cf∘c_prev),
  c = f∘c_prev + i∘tanh(z_g), o = σ(z_o + w_co∘c) (the NEW cell), h = o∘tanh(c),
* an optional initial state per layer,
* variable lengths per sample (``lengths``): each sample runs alone over its own valid steps
  (both directions of a bidirectional layer; the reverse one starts at its last valid step),
  its outputs zero after them, its final state the one after them,
* variational dropout masks (``masks``, drawn by the caller): x_t * m_x and h_prev * m_h are
  what the convolution reads, the same masks at every step; the h carried on (and returned)
  is not masked.

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
                       spatial_dims: int = 2, device=None) -> list[LayerParams]:
    """Detached copies (in ``dtype``) of the parameters of a ConvLSTM, read through the
    state_dict keys of the popular module: cell_list.{l}.conv.weight/bias, cell_list.{l}.peephole
    (``prefix="cell_list_reverse"`` for a bidirectional model's reverse cells).

    ``dilation``: one value or a list per layer (an int or a tuple each); the test knows
    what it constructed, so it is passed in rather than read from the module. ``device``: where
    the copies go (None: the module's).
    """
    sd = module.state_dict()
    dil = dilation if isinstance(dilation, list) else [dilation] * num_layers
    out = []
    for layer in range(num_layers):
        def get(key, layer=layer):
            t = sd.get(f"{prefix}.{layer}.{key}")
            if t is None:
                return None
            return t.detach().to(device, dtype).clone().requires_grad_(requires_grad)

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


def _direction(seq: Tensor, p: LayerParams, h, c, state_dtype, steps, mask=None) -> tuple:
    """One direction over (B, T, C, *spatial) in the order ``steps``: (outputs in time order,
    (h, c) after the last step taken). ``mask``: None or (input mask or None, recurrent mask or
    None), each (B, C, *spatial), applied to what the convolution reads at every step."""
    b, _, _, *spatial = seq.shape
    if h is None:
        h = seq.new_zeros(b, p.hidden, *spatial)
        c = seq.new_zeros(b, p.hidden, *spatial, dtype=state_dtype or seq.dtype)
    m_x, m_h = (None, None) if mask is None else mask
    outs = {}
    for step in steps:
        x_t = seq[:, step]
        x_in = x_t if m_x is None else x_t * m_x.to(x_t.dtype)
        h_in = h if m_h is None else h * m_h.to(h.dtype)
        # cell_step reads h only through the convolution: the masked h goes in there, and the
        # unmasked h_new comes back as the output and the next step's state.
        h, c = cell_step(x_in, h_in, c, p, state_dtype)
        outs[step] = h
    return torch.stack([outs[t] for t in sorted(outs)], dim=1), (h, c)


def _halves(v: Tensor | None, hid: int):
    return (None, None) if v is None else (v[:, :hid], v[:, hid:])


def convlstm(x: Tensor, layers: list[LayerParams], hidden_state=None, batch_first: bool = True,
             state_dtype: torch.dtype | None = None, reverse: list[LayerParams] | None = None,
             lengths=None, masks=None):
    """Returns (outputs per layer, each (B, T, hidden, *spatial); [(h, c)] per layer), for 1, 2
    or 3 spatial dims. ``reverse``: the reverse cells' parameters of a bidirectional model (each
    layer's output and state concatenate the forward and the reverse direction's along
    channels; the reverse one reads t = T-1 down to 0, its final state is after x[0]).

    ``lengths``: None (every sample has T steps) or one int per sample (a list or a tensor),
    each in 1..T: sample b reads x[b, :lengths[b]] only (see :func:`_by_sample`).

    ``masks``: None or one entry per layer, each None or a tuple with one pair per direction
    (forward first), ``(input_mask or None, recurrent_mask or None)``: the input mask
    (B, C_in, *spatial) multiplies x_t and the recurrent one (B, hidden, *spatial) the h_prev
    the convolution reads, at every step."""
    if not batch_first:
        x = x.transpose(0, 1)
    if lengths is not None:
        return _by_sample(x, layers, hidden_state, state_dtype, reverse, lengths, masks)
    t = x.shape[1]
    seq = x
    outputs, states = [], []
    for li, p in enumerate(layers):
        h, c = (None, None) if hidden_state is None else hidden_state[li]
        layer_masks = (None, None) if masks is None or masks[li] is None else tuple(masks[li])
        if reverse is None:
            seq, (h, c) = _direction(seq, p, h, c, state_dtype, range(t), layer_masks[0])
        else:
            (hf, hr), (cf, cr) = _halves(h, p.hidden), _halves(c, p.hidden)
            fwd, (hf, cf) = _direction(seq, p, hf, cf, state_dtype, range(t), layer_masks[0])
            rev, (hr, cr) = _direction(seq, reverse[li], hr, cr, state_dtype,
                                       reversed(range(t)), layer_masks[1])
            seq = torch.cat([fwd, rev], dim=2)
            h, c = torch.cat([hf, hr], dim=1), torch.cat([cf, cr], dim=1)
        outputs.append(seq)
        states.append((h, c))
    return outputs, states


def _by_sample(x: Tensor, layers, hidden_state, state_dtype, reverse, lengths, masks):
    """Variable lengths, the plainest way: sample b alone (its slice of x, of the given states
    and of the masks) over its first lengths[b] steps through every layer, as if the sequence
    ended there (so a reverse direction starts at step lengths[b]-1); its outputs padded with
    zeros to T; the samples concatenated along the batch again. x is (B, T, C, *spatial)."""
    b_total, t = x.shape[:2]
    lengths = [int(n) for n in lengths]
    assert len(lengths) == b_total and all(1 <= n <= t for n in lengths), lengths

    def one(v, b):
        return None if v is None else v[b : b + 1]

    per_sample = []
    for b, n in enumerate(lengths):
        state_b = (None if hidden_state is None
                   else [(one(h, b), one(c, b)) for h, c in hidden_state])
        masks_b = (None if masks is None
                   else [None if m is None else tuple((one(mx, b), one(mh, b)) for mx, mh in m)
                         for m in masks])
        outs, states = convlstm(x[b : b + 1, :n], layers, state_b, True, state_dtype, reverse,
                                masks=masks_b)
        padded = [torch.cat([o, o.new_zeros(1, t - n, *o.shape[2:])], dim=1) for o in outs]
        per_sample.append((padded, states))
    outputs = [torch.cat([outs[li] for outs, _ in per_sample]) for li in range(len(layers))]
    states = [(torch.cat([st[li][0] for _, st in per_sample]),
               torch.cat([st[li][1] for _, st in per_sample])) for li in range(len(layers))]
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
