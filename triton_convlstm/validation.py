"""Argument and input checks: a clear ValueError/TypeError naming the argument, expected vs
actual, before anything is computed (never a crash deep in a kernel)."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .conv import pad_fits
from .reference import state_dtype


def _is_int(value) -> bool:
    """An int, or an integer type that says it is one (NumPy's int64, ...); not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, Tensor) or (value.dim() == 0 and value.dtype != torch.bool)


def positive_int(name: str, value: Any) -> int:
    """A positive int (integer types and 0-dim integer tensors included; not a bool).

    Args:
        name: the argument's name, for the error.
        value: the value to check.

    Returns:
        value as an int.

    Raises:
        TypeError: not an integer.
        ValueError: not positive.
    """
    if not _is_int(value):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    value = operator.index(value)
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def flag(name: str, value: Any) -> bool:
    """A keyword switch this package adds: True or False only (a string such as "False" would
    otherwise turn it on).

    Args:
        name: the argument's name, for the error.
        value: the value to check.

    Returns:
        value, unchanged.

    Raises:
        TypeError: not a bool.
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def drop_in_flag(name: str, value: Any) -> bool:
    """A switch of the popular module (batch_first, bias, return_all_layers): True or False, or
    1 or 0 as ints. Anything else is an error: ``batch_first="False"`` would be read as True.

    Args:
        name: the argument's name, for the error.
        value: the value to check.

    Returns:
        value as a bool.

    Raises:
        TypeError: not a bool and not the int 0 or 1.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if _is_int(value) and operator.index(value) in (0, 1):
        return bool(operator.index(value))
    raise TypeError(f"{name}: expected True or False (or 1 or 0), got "
                    f"{type(value).__name__} {value!r}")


def finite_number(name: str, value: Any) -> int | float:
    """A finite real number (int or float, not a bool), e.g. forget_bias.

    Raises:
        TypeError: not a number. ValueError: inf or nan.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return value


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """A string among ``choices`` (padding_mode, backend).

    Raises:
        ValueError: naming the argument and the choices.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def per_layer_choice(name: str, value: Any, num_layers: int,
                     choices: tuple[str, ...]) -> list[str]:
    """One string among ``choices`` for every layer, or a list with one per layer.

    Raises:
        ValueError: naming the argument: a value not among the choices, or a list of the wrong
            length.
    """
    if isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            raise ValueError(f"{name}: expected one value or a list of num_layers={num_layers} "
                             f"values, got a list of {len(value)}")
        return [one_of(name, v, choices) for v in value]
    return [one_of(name, value, choices)] * num_layers


def _no_float(name: str, value: Any) -> None:
    """Sizes are ints: a float (3.0 from arithmetic, say) is named as such, not as 'not a
    pair' or 'a list of the wrong length'."""
    items = value if isinstance(value, (tuple, list)) else (value,)
    for v in items:
        if isinstance(v, float):
            raise TypeError(f"{name}: expected ints, got float {v!r}")


# The spatial dims' names per dimensionality, for messages.
SPATIAL_NAMES = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def _what(n: int) -> str:
    """How an n-tuple argument is described: 'a pair (h, w)' for 2-d (the messages users of
    the 2-d layer know), 'a tuple of n' otherwise."""
    if n == 2:
        return "a pair (h, w) of ints"
    return f"a tuple of {n} int" + ("s" if n > 1 else "")


def ntuple(name: str, value: Any, n: int = 2) -> tuple[int, ...]:
    """A positive int k -> (k,) * n; a tuple or list of n positive ints -> a tuple of them.

    Args:
        name: the argument's name, for the error.
        value: the value to check (kernel_size, dilation, image_size).
        n: how many (the spatial dims: 1, 2 or 3).

    Returns:
        n ints.

    Raises:
        TypeError, ValueError: as :func:`positive_int`, or not an int or n of them.
    """
    _no_float(name, value)
    if _is_int(value):
        value = (value,) * n
    if not isinstance(value, (tuple, list)) or len(value) != n:
        raise TypeError(f"{name}: expected an int or {_what(n)}, got {value!r}")
    return tuple(positive_int(name, v) for v in value)


def per_layer(name: str, value: Any, num_layers: int, scalar: type[int] | None = None,
              n: int = 2) -> list[int] | list[tuple[int, ...]]:
    """One value for all layers, or a list with one per layer.

    ``scalar=int`` (hidden_dim) takes ints; otherwise (kernel_size, dilation) each entry is an
    int or an n-tuple, and a tuple of n ints is one value for every layer.

    Args:
        name: the argument's name, for the error.
        value: one value, or a list (or tuple) of num_layers values.
        num_layers: how many values to return.
        scalar: int for positive ints, None for n-tuples.
        n: the tuples' length (the spatial dims).

    Returns:
        num_layers values, each checked by :func:`positive_int` or :func:`ntuple`.

    Raises:
        TypeError, ValueError: naming the argument, with a hint for a likely mix-up.
    """
    _no_float(name, value)
    ints = isinstance(value, tuple) and all(_is_int(v) for v in value)
    if scalar is None and ints and len(value) != n:
        # A tuple of ints is one size per spatial dim, never one per layer (a list is): a 2-d
        # (kh, kw) given to a 3-d layer must not pass as two layers' kernels.
        raise TypeError(f"{name}: expected an int, {_what(n)}, or a list with one per layer, "
                        f"got tuple {value!r}")
    one = _is_int(value) or (scalar is None and ints)
    if one:
        values = [value] * num_layers
    elif isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            hint = ""
            if scalar is None and len(value) == n and all(_is_int(v) for v in value):
                what = "(h, w)" if n == 2 else f"{n}-tuple"
                hint = f"; for one {what} for every layer pass a tuple: {tuple(value)}"
            raise ValueError(
                f"{name}: expected one value or a list of num_layers={num_layers} values, "
                f"got a list of {len(value)}{hint}"
            )
        values = list(value)
    else:
        raise TypeError(f"{name}: expected an int or a list of num_layers values, got {value!r}")
    if scalar is int:
        return [positive_int(name, v) for v in values]
    return [ntuple(name, v, n) for v in values]


def float_tensor(name: str, x: Any) -> None:
    """Raises a TypeError unless x is a floating-point tensor.

    Args:
        name: the argument's name, for the error.
        x: the value to check.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def _same_device(name: str, x: Tensor, weight: Tensor) -> None:
    if x.device != weight.device:
        raise ValueError(
            f"{name}: expected a tensor on the parameters' device {weight.device}, got {x.device}"
        )


def _channels(name: str, x: Tensor, dim: int, expected: int) -> None:
    if x.shape[dim] != expected:
        raise ValueError(
            f"{name}: expected {expected} channels at dim {dim}, got {x.shape[dim]} "
            f"(shape {tuple(x.shape)})"
        )


def _nonempty(name: str, x: Tensor, what: str) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name}: expected non-zero sizes {what}, got shape {tuple(x.shape)}")


def frame_input(x: Any, input_dim: int, weight: Tensor, spatial_dims: int = 2) -> None:
    """Checks a cell's input_tensor.

    Args:
        x: should be (B, input_dim, *spatial), floating, non-empty, on weight's device.
        input_dim: the expected channels.
        weight: a parameter of the module, for its device.
        spatial_dims: how many spatial dims (1, 2 or 3).

    Raises:
        TypeError, ValueError: naming input_tensor.
    """
    float_tensor("input_tensor", x)
    layout = f"(B, C, {', '.join(SPATIAL_NAMES[spatial_dims])})"
    if x.dim() != 2 + spatial_dims:
        raise ValueError(f"input_tensor: expected {2 + spatial_dims} dims {layout}, got "
                         f"{x.dim()} (shape {tuple(x.shape)})")
    _channels("input_tensor", x, 1, input_dim)
    _nonempty("input_tensor", x, layout)
    _same_device("input_tensor", x, weight)


def sequence_input(x: Any, input_dim: int, weight: Tensor, batch_first: bool,
                   spatial_dims: int = 2) -> None:
    """Checks a ConvLSTM's input_tensor.

    Args:
        x: should be (B, T, input_dim, *spatial) if batch_first else (T, B, input_dim,
            *spatial), floating, with T >= 1 and no zero size, on weight's device.
        input_dim: the expected channels.
        weight: a parameter of the module, for its device.
        batch_first: the module's layout.
        spatial_dims: how many spatial dims (1, 2 or 3).

    Raises:
        TypeError, ValueError: naming input_tensor.
    """
    float_tensor("input_tensor", x)
    names = ", ".join(SPATIAL_NAMES[spatial_dims])
    layout = f"(B, T, C, {names})" if batch_first else f"(T, B, C, {names})"
    if x.dim() != 3 + spatial_dims:
        raise ValueError(f"input_tensor: expected {3 + spatial_dims} dims {layout}, got "
                         f"{x.dim()} (shape {tuple(x.shape)})")
    _channels("input_tensor", x, 2, input_dim)
    steps = x.shape[1] if batch_first else x.shape[0]
    if steps == 0:
        raise ValueError(f"input_tensor: expected sequence length T >= 1, got T == 0 "
                         f"(shape {tuple(x.shape)})")
    _nonempty("input_tensor", x, layout)
    _same_device("input_tensor", x, weight)


def padding_fits(name: str, padding_mode: str, pads: Sequence[int],
                 spatial: Sequence[int]) -> None:
    """Frames large enough for the padding (:func:`triton_convlstm.conv.pad_fits`: "reflect"
    each pad less than its side, "circular" at most; "zeros" and "replicate" any size), as a
    ValueError naming the input where they are not.

    Args:
        name: the input's name, for the error.
        padding_mode: the convolution's.
        pads: as conv.same_padding gives them: F.pad's order, last dim first, (lo, hi) each.
        spatial: the frames' sizes (L; H, W; D, H, W).

    Raises:
        ValueError: naming the input, the mode and the sizes.
    """
    if not pad_fits(pads, spatial, padding_mode):
        need = "less than" if padding_mode == "reflect" else "at most"
        sizes = ", ".join(f"{n}={v}" for n, v in zip(SPATIAL_NAMES[len(spatial)], spatial))
        raise ValueError(
            f"{name}: padding_mode={padding_mode!r} pads (F.pad order, last dim first) "
            f"{tuple(pads)}, each {need} the frame's side, got {sizes}")


def autocasting(x: Tensor) -> bool:
    """Whether autocast applies to x, as it would to a convolution's input: on for x's device,
    and x not float64 (autocast leaves float64 alone).

    Args:
        x: the input, any shape, floating.
    """
    if x.is_meta:  # autocast knows no meta device (it raises); shape inference needs none
        return False
    return torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's where it applies, else x's (which must then
    equal the parameters').

    Args:
        x: the input, any shape, floating.
        weight: a parameter of the module, for its dtype.

    Raises:
        TypeError: x's dtype is not the parameters' outside autocast.
    """
    if autocasting(x):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype != weight.dtype:
        fix = ("autocast leaves float64 alone: convert the module with .to(torch.float64) or "
               "pass float32" if torch.is_autocast_enabled(x.device.type)
               else "convert the module with .to(dtype) or use torch.autocast")
        raise TypeError(
            f"input_tensor: expected dtype {weight.dtype} (the parameters' dtype), got "
            f"{x.dtype}; {fix}"
        )
    return x.dtype


def state_pair(name: str, pair_: Any, shape: Sequence[int], dtype: torch.dtype,
               device: torch.device, cast: bool = False) -> tuple[Tensor, Tensor]:
    """(h, c) checked: h in the compute dtype, c in the state dtype. ``cast`` (under autocast):
    float states of any other dtype are cast to those (more leniently than autocast, which
    leaves float64 alone), so zeros made outside autocast, or states a run outside it
    returned, work.

    Args:
        name: the argument's name, for the error.
        pair_: should be a tuple or list (h, c) of tensors.
        shape: (B, hidden, H, W), the shape of both.
        dtype: the compute dtype.
        device: the input's device.
        cast: cast floating states to the expected dtypes first.

    Returns:
        (h, c), h in dtype, c in the state dtype, (B, hidden, H, W) each.

    Raises:
        TypeError, ValueError: naming the argument and h or c.
    """
    if not isinstance(pair_, (tuple, list)) or len(pair_) != 2:
        hint = ("; hidden_state takes a list with one (h, c) pair per layer"
                if name.startswith("hidden_state") else "")
        raise TypeError(f"{name}: expected a pair (h, c) of tensors, got "
                        f"{type(pair_).__name__}{hint}")
    out = []
    for part, want in zip(pair_, (dtype, state_dtype(dtype))):
        label = f"{name} {'h' if not out else 'c'}"
        if not isinstance(part, Tensor):
            raise TypeError(f"{label}: expected a torch.Tensor, got {type(part).__name__}")
        if tuple(part.shape) != tuple(shape):
            raise ValueError(f"{label}: expected shape {tuple(shape)}, got {tuple(part.shape)}")
        if cast and part.is_floating_point():
            part = part.to(want)
        if part.dtype != want:
            raise TypeError(f"{label}: expected dtype {want}, got {part.dtype}")
        if part.device != device:
            raise ValueError(f"{label}: expected device {device}, got {part.device}")
        out.append(part)
    return out[0], out[1]


def hidden_state(states: Any, shapes: Sequence[Sequence[int]], dtype: torch.dtype,
                 device: torch.device,
                 cast: bool = False) -> list[tuple[Tensor, Tensor] | tuple[None, None]]:
    """None -> (None, None) per layer (zero states); else one (h, c) per layer, checked.

    Args:
        states: None, or should be one (h, c) per layer.
        shapes: per layer, (B, hidden, H, W).
        dtype: the compute dtype.
        device: the input's device.
        cast: see :func:`state_pair`.

    Returns:
        One pair per layer, as :func:`state_pair` returns, or (None, None).

    Raises:
        TypeError, ValueError: naming hidden_state, with a hint for a likely mix-up.
    """
    if states is None:
        return [(None, None)] * len(shapes)
    if not isinstance(states, (list, tuple)) or len(states) != len(shapes):
        got = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
        hint = ""
        if isinstance(states, (list, tuple)) and all(isinstance(t, Tensor) for t in states):
            hint = "; for one layer pass [(h, c)], a list holding the pair"
        elif isinstance(states, (list, tuple)) and len(states) < len(shapes):
            hint = ("; to continue a sequence, pass last_states from a model built with "
                    "return_all_layers=True (it returns every layer's)")
        raise ValueError(
            f"hidden_state: expected a list of {len(shapes)} (h, c) pairs (one per layer), "
            f"got {got}{hint}"
        )
    return [
        state_pair(f"hidden_state[{i}]", s, shape, dtype, device, cast)
        for i, (s, shape) in enumerate(zip(states, shapes))
    ]


def cast_params(
    weight: Tensor, bias: Tensor | None, peephole: Tensor | None, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The convolution's parameters in the compute dtype (no copy when they already are), the
    peepholes in the state dtype: they scale the float32 cell, elementwise, where autocast would
    not round a float32 parameter to 16 bits (and a 16-bit one widens exactly).

    Args:
        weight: (4*hidden, C + hidden, kh, kw).
        bias: (4*hidden,) or None.
        peephole: (3, hidden) or None.
        dtype: the compute dtype.

    Returns:
        (weight, bias, peephole), shapes unchanged.
    """
    def cast(t, to):  # a no-op .to() still costs a dispatch a step
        return t if t is None or t.dtype == to else t.to(to)

    return cast(weight, dtype), cast(bias, dtype), cast(peephole, state_dtype(dtype))
