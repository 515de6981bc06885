"""Argument and input checks: a clear ValueError/TypeError naming the argument, expected vs
actual, before anything is computed (never a crash deep in a kernel)."""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import state_dtype


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def flag(name: str, value) -> bool:
    """A keyword switch this package adds: True or False only (a string such as "False" would
    otherwise turn it on)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def pair(name: str, value) -> tuple[int, int]:
    """An int or a 2-sequence of positive ints -> (a, b)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}: expected an int or a pair (h, w) of ints, got {value!r}")
    for v in value:
        positive_int(name, v)
    return tuple(value)


def per_layer(name: str, value, num_layers: int, scalar=None) -> list:
    """One value for all layers, or a list with one per layer.

    ``scalar=int`` (hidden_dim) takes ints; otherwise (kernel_size, dilation) each entry is an
    int or an (h, w) pair, and a tuple of two ints is one pair for every layer."""
    one = (isinstance(value, int) and not isinstance(value, bool)) or (
        scalar is None and isinstance(value, tuple) and len(value) == 2
        and all(isinstance(v, int) for v in value)
    )
    if one:
        values = [value] * num_layers
    elif isinstance(value, (list, tuple)):
        if len(value) != num_layers:
            hint = ""
            if scalar is None and len(value) == 2 and all(isinstance(v, int) for v in value):
                hint = f"; for one (h, w) for every layer pass a tuple: {tuple(value)}"
            raise ValueError(
                f"{name}: expected one value or a list of num_layers={num_layers} values, "
                f"got a list of {len(value)}{hint}"
            )
        values = list(value)
    else:
        raise TypeError(f"{name}: expected an int or a list of num_layers values, got {value!r}")
    check = positive_int if scalar is int else pair
    return [check(name, v) for v in values]


def _float_tensor(name: str, x) -> None:
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


def frame_input(x, input_dim: int, weight: Tensor) -> None:
    """x: (B, input_dim, H, W)."""
    _float_tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected 4 dims (B, C, H, W), got {x.dim()} (shape {tuple(x.shape)})")
    _channels("x", x, 1, input_dim)
    _nonempty("x", x, "(B, C, H, W)")
    _same_device("x", x, weight)


def sequence_input(x, input_dim: int, weight: Tensor, batch_first: bool) -> None:
    """x: (B, T, C, H, W) if batch_first else (T, B, C, H, W)."""
    _float_tensor("x", x)
    layout = "(B, T, C, H, W)" if batch_first else "(T, B, C, H, W)"
    if x.dim() != 5:
        raise ValueError(f"x: expected 5 dims {layout}, got {x.dim()} (shape {tuple(x.shape)})")
    _channels("x", x, 2, input_dim)
    steps = x.shape[1] if batch_first else x.shape[0]
    if steps == 0:
        raise ValueError(f"x: expected sequence length T >= 1, got T == 0 (shape {tuple(x.shape)})")
    _nonempty("x", x, layout)
    _same_device("x", x, weight)


def compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's where it is on, else x's (which must then
    equal the parameters')."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if x.dtype != weight.dtype:
        raise TypeError(
            f"x: expected dtype {weight.dtype} (the parameters' dtype), got {x.dtype}; "
            "convert the module with .to(dtype) or use torch.autocast"
        )
    return x.dtype


def state_pair(name: str, pair_, shape, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    if not isinstance(pair_, (tuple, list)) or len(pair_) != 2:
        raise TypeError(f"{name}: expected a pair (h, c) of tensors, got {type(pair_).__name__}")
    out = []
    for part, want in zip(pair_, (dtype, state_dtype(dtype))):
        label = f"{name} {'h' if not out else 'c'}"
        if not isinstance(part, Tensor):
            raise TypeError(f"{label}: expected a torch.Tensor, got {type(part).__name__}")
        if tuple(part.shape) != tuple(shape):
            raise ValueError(f"{label}: expected shape {tuple(shape)}, got {tuple(part.shape)}")
        if part.dtype != want:
            raise TypeError(f"{label}: expected dtype {want}, got {part.dtype}")
        if part.device != device:
            raise ValueError(f"{label}: expected device {device}, got {part.device}")
        out.append(part)
    return out[0], out[1]


def hidden_state(states, shapes, dtype: torch.dtype, device) -> list:
    """None -> zeros (None, None) per layer; else one (h, c) per layer, checked."""
    if states is None:
        return [(None, None)] * len(shapes)
    if not isinstance(states, (list, tuple)) or len(states) != len(shapes):
        got = len(states) if isinstance(states, (list, tuple)) else type(states).__name__
        raise ValueError(
            f"hidden_state: expected a list of {len(shapes)} (h, c) pairs (one per layer), "
            f"got {got}"
        )
    return [
        state_pair(f"hidden_state[{i}]", s, shape, dtype, device)
        for i, (s, shape) in enumerate(zip(states, shapes))
    ]


def cast_params(weight: Tensor, bias: Tensor | None, peephole: Tensor | None, dtype):
    """The parameters in the compute dtype (no copy when they already are)."""
    return (
        weight.to(dtype),
        None if bias is None else bias.to(dtype),
        None if peephole is None else peephole.to(dtype),
    )
