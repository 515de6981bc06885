"""Trained Keras ConvLSTM weights as this package's state_dict.

Converted: the weights of Keras' ``ConvLSTM1D``/``ConvLSTM2D``/``ConvLSTM3D`` (one cell per
stacked layer) and of ``Bidirectional(ConvLSTM…D(...), merge_mode="concat")``, into
``cell_list.{l}.conv.weight`` (4*hidden, in + hidden, *k) and ``cell_list.{l}.conv.bias``
(4*hidden,), plus ``cell_list_reverse.{l}.…`` for the backward direction. No peephole keys: Keras
has none, so load into a model built with ``peephole=False`` (the default) and ``bias`` as the
Keras layers' ``use_bias``.

What Keras stores (keras-team/keras, ``keras/src/layers/rnn/``; the same layout, gate order
and equations in Keras 2.15's ``keras/layers/rnn/base_conv_lstm.py``):

- ``conv_lstm.py``, ``ConvLSTMCell.build``: the weights are created in the order kernel
  (kernel_size + (in_channels, 4*filters)), recurrent_kernel (kernel_size + (filters,
  4*filters)), bias (4*filters,), the last only with ``use_bias``; ``get_weights()`` lists
  them in that order.
- ``ConvLSTMCell.call``: kernel, recurrent kernel and bias are each cut into 4 equal blocks
  along the last axis, in the order i, f, c, o; i, f and o go through
  ``recurrent_activation``, the candidate c through ``activation`` (tanh), and
  ``c_t = f*c_{t-1} + i*tanh(.)``, ``h_t = o*tanh(c_t)``. The input is convolved with the
  kernel plus the bias (the layer's ``padding``, ``strides``, ``dilation_rate``), h with the
  recurrent kernel, always "same", stride 1 and without dilation; the two are added.
- The backends' ``conv`` is a cross-correlation, as torch's, taking the kernel as
  (*k, in, out) (the torch backend permutes it to (out, in, *k) and convolves without a flip);
  "same" pads ``total // 2`` before and the rest after, so an even kernel pads one more at the
  end, as this package does (``backend/torch/nn.py``, ``_compute_padding_length``).
- ``bidirectional.py``: the wrapper holds ``forward_layer`` and then ``backward_layer`` (a copy
  with ``go_backwards=True``); a layer's weights list its own variables and then its
  sub-layers' in the order they were assigned (``layer.py``, ``Layer.weights``), so
  ``get_weights()`` is the forward layer's list followed by the backward one's (its
  ``weights=`` argument is split at the half the same way). With return_sequences the
  backward output is flipped back in time and, with "concat", joined after the forward one
  on the channel axis: the next layer reads 2*filters channels.

The conversion: each kernel is permuted to torch's (out, in, *k); the input kernel's channels
come first, then the recurrent kernel's, as this package convolves cat([x, h]); the 4 gate
blocks (and the bias's) are reordered from Keras' i, f, c, o to this package's i, f, o, g
(g is Keras' c). The sum of the two convolutions equals the one convolution of the
concatenation because both pad "same" identically here.

What does not carry over (the weights load; the results differ):

- ``padding``: Keras' default is "valid" for the input convolution; this package is "same"
  only. Only models built with ``padding="same"`` convert exactly.
- ``recurrent_activation``: Keras 2's default was "hard_sigmoid", Keras 3's is "sigmoid"; this
  package uses sigmoid, so only sigmoid models convert exactly. ``activation`` must be tanh.
- ``strides`` > 1 (not available here) and ``dilation_rate`` > 1 (Keras dilates only the
  input convolution; this package dilates the convolution of [x, h]).
- Layout: Keras is batch-major; with ``data_format="channels_last"`` (the default) an input
  (B, T, *spatial, C) must be permuted to (B, T, C, *spatial) for ``batch_first=True``, and
  outputs permuted back. The weights are the same for either ``data_format``.
- Keras ``Bidirectional`` merge modes other than "concat", ``go_backwards`` on a plain layer,
  ``stateful`` and Keras' masking are not represented (a masked step there carries the state
  and repeats the last output; the layer's ``lengths`` gives zeros past each end, as
  ``nn.LSTM`` pads). Dropout rates are constructor options of the layer, not weights.

>>> import numpy as np
>>> from triton_convlstm import ConvLSTM
>>> rng = np.random.default_rng(0)
>>> weights = [rng.standard_normal((3, 3, 2, 32)).astype(np.float32),  # (kh, kw, in, 4*filters)
...            rng.standard_normal((3, 3, 8, 32)).astype(np.float32),
...            np.zeros(32, np.float32)]  # e.g. keras_model.layers[0].get_weights()
>>> state = keras_state_dict([weights])
>>> state["cell_list.0.conv.weight"].shape
torch.Size([32, 10, 3, 3])
>>> m = ConvLSTM(2, 8, 3, num_layers=1, batch_first=True)
>>> m.load_state_dict(state)
<All keys matched successfully>
>>> x = torch.randn(1, 4, 6, 6, 2)  # Keras channels_last (B, T, H, W, C)
>>> outs, _ = m(x.permute(0, 1, 4, 2, 3))
>>> outs[0].permute(0, 1, 3, 4, 2).shape  # as Keras' return_sequences output
torch.Size([1, 4, 6, 6, 8])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

# This package's gates i, f, o, g are Keras' blocks i (0), f (1), o (3), c (2).
_KERAS_BLOCK = (0, 1, 3, 2)


def keras_cell_state_dict(kernel: ArrayLike, recurrent_kernel: ArrayLike,
                          bias: ArrayLike | None = None) -> dict[str, Tensor]:
    """One Keras ConvLSTM cell's weights as one cell's ``conv`` parameters.

    Args:
        kernel: (*k, in_channels, 4*filters), Keras' gates i, f, c, o along the last axis;
            any number of spatial dims (1 for ConvLSTM1D, 2 for 2D, 3 for 3D).
        recurrent_kernel: (*k, filters, 4*filters), the same k.
        bias: (4*filters,), or None (``use_bias=False``).

    Returns:
        ``{"conv.weight": (4*filters, in_channels + filters, *k), "conv.bias": (4*filters,)}``
        (no "conv.bias" without a bias), gates i, f, o, g; new contiguous tensors, float64
        where every array given is float64, else float32.

    Raises:
        ValueError: naming the argument, with the expected and the actual shape.

    >>> sd = keras_cell_state_dict(np.ones((5, 3, 16)), np.ones((5, 4, 16)), np.zeros(16))
    >>> sd["conv.weight"].shape, sd["conv.bias"].shape, sd["conv.weight"].dtype
    (torch.Size([16, 7, 5]), torch.Size([16]), torch.float64)
    """
    return _cell(kernel, recurrent_kernel, bias, ("kernel", "recurrent_kernel", "bias"))


def keras_state_dict(layers: Sequence[Sequence[ArrayLike]], *,
                     bidirectional: bool = False) -> dict[str, Tensor]:
    """A stack of Keras ConvLSTM layers' weights as a whole model's state_dict.

    Args:
        layers: one entry per stacked layer, first to last, each that layer's
            ``get_weights()``: [kernel, recurrent_kernel(, bias)]; for ``bidirectional``, a
            ``Bidirectional(..., merge_mode="concat")`` wrapper's: the forward layer's list
            followed by the backward layer's. Shapes as :func:`keras_cell_state_dict`'s; layer
            l > 0 reads the previous layer's filters (twice that for bidirectional) channels.
        bidirectional: the layers are Bidirectional wrappers.

    Returns:
        ``cell_list.{l}.conv.weight`` (4*filters, in + filters, *k) and ``.conv.bias``
        (4*filters,) per layer, gates i, f, o, g, and for bidirectional the backward layer's
        at ``cell_list_reverse.{l}.``; dtypes as :func:`keras_cell_state_dict`'s.

    Raises:
        ValueError: a list of the wrong length, a shape that does not fit (naming
            ``layers[l][j]``, with the expected and the actual shape), layers that disagree on
            the bias or the number of spatial dims.
    """
    if isinstance(layers, np.ndarray) or not isinstance(layers, Sequence) or not layers:
        raise ValueError("layers: expected a non-empty list with one get_weights() list per "
                         f"stacked layer, got {_describe(layers)}")
    if any(hasattr(entry, "ndim") for entry in layers):
        # The likely mistake: one layer's get_weights() passed without the outer list.
        raise ValueError("layers: expected a list of get_weights() lists, one per layer, got a "
                         "list of arrays (for one layer pass [layer.get_weights()])")
    directions = (("cell_list", 0), ("cell_list_reverse", 1)) if bidirectional else (
        ("cell_list", 0),)
    state: dict[str, Tensor] = {}
    first_kernel_shape: tuple[int, ...] = ()
    with_bias = False
    previous_filters = 0
    for layer, entry in enumerate(layers):
        weights = list(entry)
        per_direction = _arrays_per_direction(layer, len(weights), bidirectional)
        cells = []
        for prefix, direction in directions:
            start = direction * per_direction
            names = tuple(f"layers[{layer}][{start + j}] ({'backward ' if direction else ''}{n})"
                          for j, n in enumerate(("kernel", "recurrent_kernel", "bias")))
            own = weights[start : start + per_direction]
            cells.append((prefix, names, own,
                          _cell(own[0], own[1], own[2] if per_direction == 3 else None, names)))
        forward_names, forward_kernel_shape = cells[0][1], np.shape(cells[0][2][0])
        weight = cells[0][3]["conv.weight"]
        filters = weight.shape[0] // 4
        in_channels = weight.shape[1] - filters
        if layer == 0:
            first_kernel_shape, with_bias = forward_kernel_shape, per_direction == 3
        elif len(forward_kernel_shape) != len(first_kernel_shape):
            raise ValueError(f"{forward_names[0]}: expected {len(first_kernel_shape) - 2} "
                             f"spatial dims as layers[0][0] (shape {first_kernel_shape}), got "
                             f"shape {forward_kernel_shape}")
        elif (per_direction == 3) != with_bias:
            # One bias flag for the whole model: a mixed stack has no model to load into.
            raise ValueError(f"layers[{layer}]: expected {'a' if with_bias else 'no'} bias as "
                             f"layers[0] (use_bias must be the same for every layer), got "
                             f"{len(weights)} arrays")
        elif in_channels != previous_filters * len(directions):
            why = ("twice the previous layer's filters: its forward and backward outputs "
                   "concatenated, merge_mode='concat'" if bidirectional
                   else "the previous layer's filters")
            raise ValueError(f"{forward_names[0]}: expected in_channels "
                             f"{previous_filters * len(directions)} ({why}), got shape "
                             f"{forward_kernel_shape}")
        if bidirectional:
            for j, name in enumerate(cells[1][1][: per_direction]):
                expected, got = np.shape(cells[0][2][j]), np.shape(cells[1][2][j])
                if expected != got:
                    raise ValueError(f"{name}: expected shape {expected} as the forward "
                                     f"layer's, got {got}")
        for prefix, _, _, cell_state in cells:
            for key, value in cell_state.items():
                state[f"{prefix}.{layer}.{key}"] = value
        previous_filters = filters
    return state


def _arrays_per_direction(layer: int, count: int, bidirectional: bool) -> int:
    """2 or 3 (kernel, recurrent_kernel, bias?) for one direction of layer ``layer``."""
    if bidirectional:
        if count not in (4, 6):
            raise ValueError(f"layers[{layer}]: expected 4 or 6 arrays (a Bidirectional "
                             "wrapper's get_weights(): the forward layer's [kernel, "
                             "recurrent_kernel(, bias)] then the backward layer's), got "
                             f"{count}")
        return count // 2
    if count not in (2, 3):
        raise ValueError(f"layers[{layer}]: expected 2 or 3 arrays (a ConvLSTM layer's "
                         f"get_weights(): [kernel, recurrent_kernel(, bias)]), got {count}"
                         + (" (a Bidirectional wrapper's? pass bidirectional=True)"
                            if count in (4, 6) else ""))
    return count


def _cell(kernel: ArrayLike, recurrent_kernel: ArrayLike, bias: ArrayLike | None,
          names: tuple[str, ...]) -> dict[str, Tensor]:
    """keras_cell_state_dict, with the names its errors give each argument."""
    k = _array(names[0], kernel)
    if k.ndim < 3 or 0 in k.shape or k.shape[-1] % 4:
        raise ValueError(f"{names[0]}: expected shape kernel_size + (in_channels, 4*filters), "
                         f"at least one spatial dim, no zero size, the last a multiple of 4, "
                         f"got {k.shape}")
    size, filters = k.shape[:-2], k.shape[-1] // 4
    r = _array(names[1], recurrent_kernel)
    _check_shape(names[1], r, (*size, filters, 4 * filters),
                 f"kernel_size + (filters, 4*filters), from kernel shape {k.shape}")
    arrays = [k, r]
    if bias is not None:
        b = _array(names[2], bias)
        _check_shape(names[2], b, (4 * filters,), f"(4*filters,), from kernel shape {k.shape}")
        arrays.append(b)
    dtype = np.float64 if all(a.dtype == np.float64 for a in arrays) else np.float32
    n = k.ndim - 2
    # (*k, C, 4F) -> (4F, C, *k), torch's conv weight layout. Both libraries cross-correlate,
    # so the kernel is not flipped.
    to_torch = (n + 1, n, *range(n))
    weight = torch.cat([torch.from_numpy(np.ascontiguousarray(a.transpose(to_torch), dtype))
                        for a in (k, r)], dim=1)  # x's channels first, then h's: cat([x, h])
    order = torch.cat([torch.arange(blk * filters, (blk + 1) * filters) for blk in _KERAS_BLOCK])
    state = {"conv.weight": weight.index_select(0, order).contiguous()}
    if bias is not None:
        state["conv.bias"] = torch.from_numpy(np.ascontiguousarray(arrays[2], dtype)).index_select(
            0, order)  # a new tensor: never a view of the caller's array
    return state


def _array(name: str, value: ArrayLike) -> np.ndarray:
    """``value`` as a real-valued numpy array (numpy arrays, Keras variables, CPU tensors)."""
    try:
        a = np.asarray(value)
    except Exception as e:  # a CUDA tensor or one that requires grad, say
        raise ValueError(f"{name}: expected an array, got {_describe(value)} ({e})") from e
    if a.dtype.kind not in "fiu":
        raise ValueError(f"{name}: expected a real-valued array, got dtype {a.dtype}")
    return a


def _check_shape(name: str, a: np.ndarray, expected: tuple[int, ...], why: str) -> None:
    if a.shape != expected:
        raise ValueError(f"{name}: expected shape {expected} ({why}), got {a.shape}")


def _describe(value: object) -> str:
    shape = getattr(value, "shape", None)
    return type(value).__name__ + ("" if shape is None else f" of shape {tuple(shape)}")
