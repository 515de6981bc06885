"""keras_weights.py: Keras ConvLSTM weights give this package's model Keras' results.

The oracle is Keras' ConvLSTM written here in numpy from Keras' own equations
(keras/src/layers/rnn/conv_lstm.py, ConvLSTMCell.call): channels-last, gates i, f, c, o, sigmoid
and tanh, "same" padding with an even kernel's extra pixel at the end, zero initial state,
return_sequences. The layers (2-d, 1-d, 3-d, bidirectional) load converted weights and compute
Keras' results; the cell layout is also checked against this package's cell equations written
here in float64 torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from triton_convlstm import ConvLSTM
from triton_convlstm.keras_weights import keras_cell_state_dict, keras_state_dict

# --- Keras' semantics, numpy, channels-last ------------------------------------------------


def keras_conv_same(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Keras' ops.conv, stride 1, padding "same": a cross-correlation of x (B, *spatial, C) with
    kernel (*k, C, O); each dim pads (k - 1) // 2 before and the rest after."""
    size = kernel.shape[:-2]
    pads = [(0, 0)] + [((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in size] + [(0, 0)]
    xp = np.pad(x, pads)
    spatial = x.shape[1:-1]
    out = np.zeros((*x.shape[:-1], kernel.shape[-1]))
    for offset in np.ndindex(*size):
        window = xp[(slice(None), *(slice(o, o + s) for o, s in zip(offset, spatial)))]
        out += window @ kernel[offset]
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def keras_layer(x: np.ndarray, kernel: np.ndarray, recurrent_kernel: np.ndarray,
                bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One Keras ConvLSTM layer, return_sequences: x (B, T, *spatial, C) -> (B, T, *spatial,
    filters), and the last cell state."""
    filters = recurrent_kernel.shape[-2]
    ks = np.split(kernel, 4, axis=-1)  # i, f, c, o
    rs = np.split(recurrent_kernel, 4, axis=-1)
    bs = np.split(bias, 4) if bias is not None else [0.0] * 4
    h = np.zeros((x.shape[0], *x.shape[2:-1], filters))
    c = np.zeros_like(h)
    outs = []
    for t in range(x.shape[1]):
        xi, xf, xc, xo = (keras_conv_same(x[:, t], k) + b for k, b in zip(ks, bs))
        hi, hf, hc, ho = (keras_conv_same(h, r) for r in rs)
        i, f, o = sigmoid(xi + hi), sigmoid(xf + hf), sigmoid(xo + ho)
        c = f * c + i * np.tanh(xc + hc)
        h = o * np.tanh(c)
        outs.append(h)
    return np.stack(outs, axis=1), c


def keras_model(x: np.ndarray, layers: list[list[np.ndarray]]):
    """Stacked Keras layers: every layer's output sequence and last cell state."""
    outs, cells = [], []
    for weights in layers:
        x, c = keras_layer(x, weights[0], weights[1], weights[2] if len(weights) == 3 else None)
        outs.append(x)
        cells.append(c)
    return outs, cells


def keras_weights(rng, kernel_size, in_channels, filters, bias=True) -> list[np.ndarray]:
    """A random get_weights() list, in Keras' layout."""
    w = [0.4 * rng.standard_normal((*kernel_size, in_channels, 4 * filters)),
         0.4 * rng.standard_normal((*kernel_size, filters, 4 * filters))]
    return w + [0.4 * rng.standard_normal(4 * filters)] if bias else w


def channels_first(a: np.ndarray) -> torch.Tensor:
    """(B, T, *spatial, C) -> (B, T, C, *spatial)."""
    return torch.from_numpy(np.moveaxis(a, -1, 2).copy())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- This package's cell equations, float64 torch, n spatial dims --------------------------


def package_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """One layer as this package computes it: z = conv(cat[x_t, h]) ("same", the extra pixel
    at the end) + bias, gates i, f, o, g. x (B, T, C, *spatial) -> (B, T, hidden, *spatial)."""
    n = weight.ndim - 2
    hidden = weight.shape[0] // 4
    pad = []
    for k in reversed(weight.shape[2:]):  # F.pad: last dim first
        pad += [(k - 1) // 2, (k - 1) - (k - 1) // 2]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    h = x.new_zeros(x.shape[0], hidden, *x.shape[3:])
    c = torch.zeros_like(h)
    outs = []
    for t in range(x.shape[1]):
        z = conv(F.pad(torch.cat([x[:, t], h], dim=1), pad), weight, bias)
        i, f, o, g = z.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1), c


# --- 2-d: the real ConvLSTM ----------------------------------------------------------------

CASES_2D = [  # kernel per layer, bias
    ([(3, 3), (3, 3)], True),
    ([(2, 2), (4, 2)], True),  # even kernels: the extra pixel at the end
    ([(3, 2), (1, 3)], False),
    ([(2, 4), (5, 3)], False),
]


@pytest.mark.parametrize("kernels,bias", CASES_2D,
                         ids=lambda v: "x".join(map(str, v[0])) + "," + "x".join(map(str, v[1]))
                         if isinstance(v, list) else ("bias" if v else "nobias"))
def test_2d_model_computes_keras_results(kernels, bias):
    rng = np.random.default_rng(1)
    in_channels, hidden = 2, [3, 4]
    layers = [keras_weights(rng, kernels[0], in_channels, hidden[0], bias),
              keras_weights(rng, kernels[1], hidden[0], hidden[1], bias)]
    x = rng.standard_normal((2, 4, 5, 6, in_channels))  # (B, T, H, W, C)
    ref_outs, ref_cells = keras_model(x, layers)

    model = ConvLSTM(in_channels, hidden, kernels, 2, batch_first=True, bias=bias,
                     return_all_layers=True, backend="torch").double()
    model.load_state_dict(keras_state_dict(layers), strict=True)
    with torch.no_grad():
        outs, states = model(channels_first(x))
    for out, ref, (_, c), ref_c in zip(outs, ref_outs, states, ref_cells):
        assert rel(out, channels_first(ref)) <= 1e-10
        assert rel(c, torch.from_numpy(np.moveaxis(ref_c, -1, 1).copy())) <= 1e-10


def test_float32_weights_load_into_a_float32_model():
    rng = np.random.default_rng(2)
    layers = [[w.astype(np.float32) for w in keras_weights(rng, (3, 3), 2, 3)]]
    state = keras_state_dict(layers)
    assert {v.dtype for v in state.values()} == {torch.float32}
    model = ConvLSTM(2, 3, 3, 1, batch_first=True, backend="torch")
    model.load_state_dict(state, strict=True)
    x = rng.standard_normal((1, 3, 4, 4, 2)).astype(np.float32)
    with torch.no_grad():
        out = model(channels_first(x))[0][0]
    ref = keras_model(x.astype(np.float64), [[w.astype(np.float64) for w in layers[0]]])[0][0]
    assert rel(out.double(), channels_first(ref)) <= 1e-5


# --- 1-d and 3-d: the cell conversion against this package's equations ---------------------


def package_model(x: torch.Tensor, cells: list[dict[str, torch.Tensor]]):
    outs = []
    for cell in cells:
        x, _ = package_layer(x, cell["conv.weight"], cell.get("conv.bias"))
        outs.append(x)
    return outs


@pytest.mark.parametrize("kernels,spatial,bias", [
    ([(3,), (2,)], (7,), True),
    ([(4,), (1,)], (5,), False),
    ([(3, 3, 3), (2, 2, 2)], (3, 4, 5), True),
    ([(2, 3, 1), (1, 2, 3)], (4, 3, 3), False),
], ids=["1d", "1d-even-nobias", "3d", "3d-mixed-nobias"])
def test_1d_3d_cells_compute_keras_results(kernels, spatial, bias):
    rng = np.random.default_rng(3)
    in_channels, hidden = 2, [3, 2]
    layers = [keras_weights(rng, kernels[0], in_channels, hidden[0], bias),
              keras_weights(rng, kernels[1], hidden[0], hidden[1], bias)]
    x = rng.standard_normal((2, 3, *spatial, in_channels))
    ref_outs, _ = keras_model(x, layers)

    cells = [keras_cell_state_dict(*w) for w in layers]
    for cell, w, k in zip(cells, layers, kernels):
        assert set(cell) == ({"conv.weight", "conv.bias"} if bias else {"conv.weight"})
        assert cell["conv.weight"].shape == (4 * w[1].shape[-2], w[0].shape[-2] + w[1].shape[-2],
                                             *k)
        assert cell["conv.weight"].dtype == torch.float64
    for out, ref in zip(package_model(channels_first(x), cells), ref_outs):
        assert rel(out, channels_first(ref)) <= 1e-10
    # keras_state_dict gives the same cells.
    state = keras_state_dict(layers)
    for layer, cell in enumerate(cells):
        assert {f"cell_list.{layer}.{k}" for k in cell} <= state.keys()
        for key, value in cell.items():
            assert torch.equal(state[f"cell_list.{layer}.{key}"], value)
    assert len(state) == sum(len(c) for c in cells)


def test_the_test_cell_equations_are_this_packages():
    """The 1-d/3-d oracle above (package_layer) is anchored: in 2-d it equals ConvLSTM."""
    rng = np.random.default_rng(4)
    layers = [keras_weights(rng, (2, 3), 2, 3)]
    x = torch.from_numpy(rng.standard_normal((2, 3, 2, 5, 4)))
    model = ConvLSTM(2, 3, (2, 3), 1, batch_first=True, backend="torch").double()
    model.load_state_dict(keras_state_dict(layers))
    with torch.no_grad():
        out = model(x)[0][0]
    cell = keras_cell_state_dict(*layers[0])
    assert rel(package_layer(x, cell["conv.weight"], cell["conv.bias"])[0], out) <= 1e-12


# --- The layout, element by element --------------------------------------------------------

OURS_TO_KERAS_GATE = {0: 0, 1: 1, 2: 3, 3: 2}  # i, f, o, g <- Keras' i, f, o (3), c (2)


def check_cell_layout(weight, bias, kernel, recurrent_kernel, keras_bias):
    """Every element of the converted cell where the layout says it goes."""
    filters = recurrent_kernel.shape[-2]
    in_channels = kernel.shape[-2]
    size = kernel.shape[:-2]
    assert weight.shape == (4 * filters, in_channels + filters, *size)
    for gate, j, ch in np.ndindex(4, filters, in_channels + filters):
        row, col = gate * filters + j, OURS_TO_KERAS_GATE[gate] * filters + j
        for pos in np.ndindex(*size):
            want = kernel[(*pos, ch, col)] if ch < in_channels else \
                recurrent_kernel[(*pos, ch - in_channels, col)]
            assert weight[(row, ch, *pos)].item() == want
        if keras_bias is None:
            assert bias is None
        else:
            assert bias[row].item() == keras_bias[col]


def test_cell_layout_element_by_element():
    rng = np.random.default_rng(5)
    kernel, rec, b = keras_weights(rng, (2, 3), 2, 2)
    cell = keras_cell_state_dict(kernel, rec, b)
    check_cell_layout(cell["conv.weight"], cell["conv.bias"], kernel, rec, b)
    cell = keras_cell_state_dict(kernel, rec)
    check_cell_layout(cell["conv.weight"], cell.get("conv.bias"), kernel, rec, None)


def test_results_are_new_contiguous_tensors_in_float32_or_float64():
    rng = np.random.default_rng(6)
    kernel, rec, b = keras_weights(rng, (3,), 2, 2)
    cell = keras_cell_state_dict(kernel, rec, b)
    assert all(v.dtype == torch.float64 and v.is_contiguous() for v in cell.values())
    before = {k: v.clone() for k, v in cell.items()}
    kernel[...] = rec[...] = b[...] = 0  # the caller's arrays are not shared
    assert all(torch.equal(cell[k], before[k]) for k in cell)
    cell = keras_cell_state_dict(kernel.astype(np.float32), rec, b.astype(np.float16))
    assert all(v.dtype == torch.float32 for v in cell.values())
    cell = keras_cell_state_dict(torch.ones(3, 2, 8), torch.ones(3, 2, 8))  # CPU tensors too
    assert cell["conv.weight"].dtype == torch.float32


# --- Bidirectional -------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bidirectional_reverse_cells_come_from_the_second_half(bias):
    rng = np.random.default_rng(7)
    hidden = [3, 2]
    # Layer 1 reads the concatenation of layer 0's two directions: 2 * hidden[0] channels.
    layers = [keras_weights(rng, (3, 2), 2, hidden[0], bias)
              + keras_weights(rng, (3, 2), 2, hidden[0], bias),
              keras_weights(rng, (1, 3), 2 * hidden[0], hidden[1], bias)
              + keras_weights(rng, (1, 3), 2 * hidden[0], hidden[1], bias)]
    state = keras_state_dict(layers, bidirectional=True)
    half = 3 if bias else 2
    keys = {f"{prefix}.{layer}.conv.{p}" for prefix in ("cell_list", "cell_list_reverse")
            for layer in range(2) for p in (("weight", "bias") if bias else ("weight",))}
    assert set(state) == keys
    for layer, weights in enumerate(layers):
        forward, backward = weights[:half], weights[half:]
        for prefix, w in (("cell_list", forward), ("cell_list_reverse", backward)):
            weight = state[f"{prefix}.{layer}.conv.weight"]
            in_channels = 2 if layer == 0 else 2 * hidden[0]
            assert weight.shape == (4 * hidden[layer], in_channels + hidden[layer],
                                    *w[0].shape[:-2])
            check_cell_layout(weight, state.get(f"{prefix}.{layer}.conv.bias"), w[0], w[1],
                              w[2] if bias else None)
        assert not torch.equal(state[f"cell_list.{layer}.conv.weight"],
                               state[f"cell_list_reverse.{layer}.conv.weight"])


# --- Errors --------------------------------------------------------------------------------


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_cell_shape_errors_name_the_argument_and_both_shapes():
    k, r, b = np.zeros((3, 3, 2, 12)), np.zeros((3, 3, 3, 12)), np.zeros(12)
    msg = error(keras_cell_state_dict, np.zeros((2, 12)), r, b)
    assert msg.startswith("kernel:") and "(2, 12)" in msg
    msg = error(keras_cell_state_dict, np.zeros((3, 3, 2, 10)), r, b)
    assert msg.startswith("kernel:") and "(3, 3, 2, 10)" in msg and "multiple of 4" in msg
    msg = error(keras_cell_state_dict, k, np.zeros((3, 2, 3, 12)), b)
    assert msg.startswith("recurrent_kernel:") and "(3, 3, 3, 12)" in msg and "(3, 2, 3, 12)" in msg
    msg = error(keras_cell_state_dict, k, np.zeros((3, 3, 4, 12)), b)  # filters is 12 // 4
    assert msg.startswith("recurrent_kernel:") and "(3, 3, 3, 12)" in msg and "(3, 3, 4, 12)" in msg
    msg = error(keras_cell_state_dict, k, r, np.zeros(16))
    assert msg.startswith("bias:") and "(12,)" in msg and "(16,)" in msg
    msg = error(keras_cell_state_dict, k, r, np.array(["a"] * 12))
    assert msg.startswith("bias:") and "dtype" in msg


def test_model_errors_name_the_layer_and_the_array():
    rng = np.random.default_rng(8)
    one = keras_weights(rng, (3, 3), 2, 3)
    assert "empty" in error(keras_state_dict, [])
    assert "[layer.get_weights()]" in error(keras_state_dict, one)  # the outer list forgotten
    msg = error(keras_state_dict, [one[:1]])
    assert msg.startswith("layers[0]:") and "got 1" in msg
    assert "bidirectional=True" in error(keras_state_dict, [one + one])
    msg = error(keras_state_dict, [one], bidirectional=True)
    assert msg.startswith("layers[0]:") and "4 or 6" in msg and "got 3" in msg
    # The recurrent kernel of layer 1, named by its place in the list.
    bad = keras_weights(rng, (3, 3), 3, 2)
    bad[1] = np.zeros((3, 3, 3, 8))
    msg = error(keras_state_dict, [one, bad])
    assert msg.startswith("layers[1][1] (recurrent_kernel):") and "(3, 3, 2, 8)" in msg
    # Layer 1 must read layer 0's filters (twice those, bidirectional).
    msg = error(keras_state_dict, [one, keras_weights(rng, (3, 3), 4, 2)])
    assert msg.startswith("layers[1][0] (kernel):") and "in_channels 3" in msg
    assert "(3, 3, 4, 8)" in msg
    msg = error(keras_state_dict, [one + one, keras_weights(rng, (3, 3), 3, 2) * 2],
                bidirectional=True)
    assert msg.startswith("layers[1][0] (kernel):") and "in_channels 6" in msg
    msg = error(keras_state_dict, [one + keras_weights(rng, (3, 3), 2, 4)], bidirectional=True)
    assert msg.startswith("layers[0][3] (backward kernel):") and "(3, 3, 2, 12)" in msg
    assert "(3, 3, 2, 16)" in msg
    msg = error(keras_state_dict, [one, keras_weights(rng, (3,), 3, 2)])
    assert msg.startswith("layers[1][0] (kernel):") and "2 spatial dims" in msg
    msg = error(keras_state_dict, [one, keras_weights(rng, (3, 3), 3, 2, bias=False)])
    assert msg.startswith("layers[1]:") and "bias" in msg


# --- The family's layers load Keras' models: 1-d, 3-d, Bidirectional ------------------------


@pytest.mark.parametrize(("cls", "kernel", "spatial"), [
    ("ConvLSTM1d", (4,), (7,)), ("ConvLSTM3d", (3, 2, 3), (3, 4, 5))])
def test_1d_and_3d_layers_compute_keras_results(cls, kernel, spatial):
    import triton_convlstm

    rng = np.random.default_rng(7)
    layers = [keras_weights(rng, kernel, 2, 3), keras_weights(rng, kernel, 3, 4)]
    x = rng.standard_normal((2, 3, *spatial, 2))
    ref_outs, _ = keras_model(x, layers)
    model = getattr(triton_convlstm, cls)(2, [3, 4], kernel, 2, batch_first=True,
                                          return_all_layers=True, backend="torch").double()
    model.load_state_dict(keras_state_dict(layers), strict=True)
    with torch.no_grad():
        outs, _ = model(channels_first(x))
    for out, ref in zip(outs, ref_outs):
        assert rel(out, channels_first(ref)) <= 1e-10


def keras_bidirectional(x: np.ndarray, weights: list[np.ndarray]) -> np.ndarray:
    """Keras' Bidirectional(ConvLSTM(..., return_sequences=True), merge_mode="concat"): the
    backward layer reads the sequence reversed (go_backwards), its output is flipped back in
    time, and the two are concatenated on the last axis."""
    half = len(weights) // 2
    fwd, _ = keras_layer(x, *weights[:half], *([None] * (3 - half)))
    bwd, _ = keras_layer(x[:, ::-1], *weights[half:], *([None] * (3 - half)))
    return np.concatenate([fwd, bwd[:, ::-1]], axis=-1)


def test_a_bidirectional_keras_model_computes_the_same():
    import triton_convlstm

    rng = np.random.default_rng(8)
    layers = [keras_weights(rng, (3,), 2, 3) + keras_weights(rng, (3,), 2, 3),
              keras_weights(rng, (2,), 6, 4) + keras_weights(rng, (2,), 6, 4)]
    x = rng.standard_normal((2, 4, 7, 2))
    first = keras_bidirectional(x, layers[0])
    second = keras_bidirectional(first, layers[1])
    model = triton_convlstm.ConvLSTM1d(2, [3, 4], [3, 2], 2, batch_first=True,
                                       return_all_layers=True, bidirectional=True,
                                       backend="torch").double()
    model.load_state_dict(keras_state_dict(layers, bidirectional=True), strict=True)
    with torch.no_grad():
        outs, _ = model(channels_first(x))
    assert rel(outs[0], channels_first(first)) <= 1e-10
    assert rel(outs[1], channels_first(second)) <= 1e-10
