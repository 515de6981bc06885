"""The cells, one ConvLSTM step each, in 1, 2 and 3 spatial dims: parameters, init, checks; no
math here (step_op.py and step_by_step.py do the step).

Parameters match the popular ConvLSTM cell's: ``conv`` is an ``nn.Conv{n}d`` with weight
(4*hidden, in + hidden, *k), gates i, f, o, g, so its checkpoints load unchanged;
``peephole`` (3, hidden) is this package's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import validation
from .backend import check_backend_name, triton_import_error
from .conv import PADDING_MODES, module_padding, same_padding
from .quick_step import quick_cell_step
from .reference import state_dtype
from .step_by_step import calls_conv
from .step_op import cell_step, gate_update

Size = int | Sequence[int]
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class ConvLSTMCellNd(nn.Module):
    """One ConvLSTM step in ``spatial_dims`` dims: ``h, c = cell(x, (h, c))``. Use
    :class:`ConvLSTMCell1d`, :class:`ConvLSTMCell` (2-d) or :class:`ConvLSTMCell3d`.

    Args:
        input_dim: channels of x.
        hidden_dim: channels of h and c.
        kernel_size: an int or one per spatial dim; odd and even kernels keep the frame's size
            ("same" padding; where the total padding dilation*(k-1) is odd, the extra pixel
            goes at the end of the dim).
        bias: learnable bias on the gate pre-activations.
        peephole: add ``peephole`` (3, hidden): (w_ci, w_cf, w_co) of Shi et al. 2015; the
            output gate reads the new cell.
        dilation: an int or one per spatial dim.
        backend: "auto" (Triton on CUDA when available), "torch" or "triton".
        padding_mode: "zeros", "reflect", "replicate" or "circular", as nn.Conv{n}d's (set on
            ``conv``, where a later change is honoured too).

    Raises:
        TypeError, ValueError: naming the invalid argument.

    Shapes: x (B, input_dim, *spatial); h (B, hidden, *spatial) in x's dtype; c likewise in
    float32 (float64 for float64 inputs).
    """

    spatial_dims = 2

    def __init__(self, input_dim: int, hidden_dim: int, kernel_size: Size, bias: bool = True, *,
                 peephole: bool = False, dilation: Size = 1, backend: str = "auto",
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        n = self.spatial_dims
        input_dim = validation.positive_int("input_dim", input_dim)
        hidden_dim = validation.positive_int("hidden_dim", hidden_dim)
        check_backend_name(backend)
        if backend != "torch":
            triton_import_error()  # probe now, eagerly, not while torch.compile traces forward
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.kernel_size = validation.ntuple("kernel_size", kernel_size, n)
        self.dilation = validation.ntuple("dilation", dilation, n)
        self.bias = validation.drop_in_flag("bias", bias)
        self.backend = backend
        padding_mode = validation.one_of("padding_mode", padding_mode, PADDING_MODES)
        # A plain Conv{n}d holds the parameters: same names, shapes and default init as the
        # popular module, and the same padding for its odd kernels. The fast path computes from
        # its weight; it is called only where hooks or a changed conv need it (step_by_step.py).
        self.conv = self.conv_class(
            input_dim + hidden_dim, 4 * hidden_dim, self.kernel_size, padding=self.conv_padding,
            dilation=self.dilation, bias=self.bias, padding_mode=padding_mode,
        )
        # Zeros: a new peephole model starts as the plain LSTM, and init draws no random numbers,
        # so seeded weights equal the popular module's.
        peephole = validation.flag("peephole", peephole)
        self.peephole = nn.Parameter(torch.zeros(3, hidden_dim)) if peephole else None

    @property
    def conv_class(self) -> type[nn.Module]:
        """nn.Conv1d, nn.Conv2d or nn.Conv3d."""
        return _CONVS[self.spatial_dims]

    def __setstate__(self, state: dict) -> None:
        """Unpickling a cell saved before its conv took "same" padding for even kernels and
        dilation (it had the popular (k // 2, ...)): the conv is given the padding it is built
        with now, so such a model keeps the fast path and its results."""
        super().__setstate__(state)
        conv = self._modules.get("conv")
        legacy = tuple(k // 2 for k in self.kernel_size)
        if isinstance(conv, self.conv_class) and conv.padding == legacy != self.conv_padding:
            built = self.conv_class(conv.in_channels, conv.out_channels, self.kernel_size,
                                    padding=self.conv_padding, dilation=self.dilation,
                                    device="meta")
            conv.padding = built.padding
            conv._reversed_padding_repeated_twice = built._reversed_padding_repeated_twice

    def extra_repr(self) -> str:
        """The constructor arguments ``print(module)`` shows."""
        return (f"{self.input_dim}, {self.hidden_dim}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, peephole={self.peephole is not None}, "
                f"backend={self.backend!r}")

    def init_hidden(self, batch_size: int, image_size: Size) -> tuple[Tensor, Tensor]:
        """Zero states, on the parameters' device, as the popular cell's method of this name.

        Args:
            batch_size: B.
            image_size: the frame's sizes (H, W in 2-d), or one int for all.

        Returns:
            (h, c): zeros of shape (batch_size, hidden, *image_size), h in the parameters'
            dtype, c in the state dtype (float32; float64 for float64 parameters).
        """
        batch_size = validation.positive_int("batch_size", batch_size)
        size = validation.ntuple("image_size", image_size, self.spatial_dims)
        w = parameter_of(self)
        h = torch.zeros(batch_size, self.hidden_dim, *size, device=w.device, dtype=w.dtype)
        return h, torch.zeros_like(h, dtype=state_dtype(w.dtype))

    @property
    def conv_padding(self) -> tuple[int, ...] | str:
        """The padding ``conv`` is built with: one int per dim where "same" padding is
        symmetric (odd kernels: k // 2 without dilation, as the popular module), else "same"
        (nn.Conv{n}d then pads the extra pixel at the end, as conv.same_padding)."""
        return module_padding(self.kernel_size, self.dilation)

    def check_padding(self, name: str, spatial: Sequence[int]) -> None:
        """A clear error where frames of ``spatial`` size are too small for the conv's
        padding_mode."""
        mode = getattr(self.conv, "padding_mode", "zeros")  # a replaced conv may have none
        if mode in ("reflect", "circular"):  # the others pad any size
            validation.padding_fits(name, mode, same_padding(self.kernel_size, self.dilation),
                                    spatial)

    @property
    def padding(self) -> tuple[int, ...]:
        """The popular cell's attribute: k // 2 per dim, "same" for odd kernels (even ones pad
        one more at the end here; see conv.same_padding)."""
        return tuple(k // 2 for k in self.kernel_size)

    def forward(self, input_tensor: Tensor,
                cur_state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """One step. (Argument names as the popular cell's, so keyword calls keep working.)

        Args:
            input_tensor: (B, input_dim, *spatial), floating, the parameters' dtype (any float
                dtype under autocast, which sets the compute dtype).
            cur_state: (h, c), each (B, hidden, *spatial), h in the compute dtype, c in the
                state dtype (float32; float64 for float64); or None (zeros).

        Returns:
            (h, c): the new states, (B, hidden, *spatial) each, h in the compute dtype, c in
            the state dtype.
        """
        quick = quick_cell_step(self, input_tensor, cur_state)  # the common CPU call
        if quick is not None:
            return quick
        x = input_tensor
        plain = not calls_conv(self)
        # The weight is read once a step: a parametrized one is computed when read.
        like = self.conv.weight if plain else parameter_of(self)
        validation.frame_input(x, self.input_dim, like, self.spatial_dims)
        dtype = validation.compute_dtype(x, like)
        b, _, *spatial = x.shape
        self.check_padding("input_tensor", spatial)
        if cur_state is None:
            h, c = self.init_hidden(b, tuple(spatial))
            h, c = h.to(dtype), c.to(state_dtype(dtype))
        else:
            h, c = validation.state_pair(
                "cur_state", cur_state, (b, self.hidden_dim, *spatial), dtype, x.device,
                cast=validation.autocasting(x),
            )
        if not plain:  # called as a module: its hooks run, its own padding and forward apply
            z = self.conv(torch.cat([x.to(dtype), h], dim=1))
            peep = None if self.peephole is None else self.peephole.to(state_dtype(dtype))
            return gate_update(z, c, peephole=peep, backend=self.backend)
        weight, bias, peep = validation.cast_params(like, self.conv.bias, self.peephole, dtype)
        h, c = cell_step(x if x.dtype == dtype else x.to(dtype), h, c, weight, bias, peep,
                         self.dilation, self.backend, padding_mode=self.conv.padding_mode)
        # Contiguous, as the popular cell's (its users call .view() on them): large CPU frames
        # are computed channels-last (step_op.CHANNELS_LAST_PIXELS).
        return h.contiguous(), c.contiguous()


def parameter_of(cell: nn.Module) -> Tensor:
    """A parameter of the cell's convolution, for its device and dtype without reading
    ``conv.weight`` (a parametrized weight is computed when read)."""
    return next(cell.conv.parameters())


class ConvLSTMCell1d(ConvLSTMCellNd):
    """One ConvLSTM step over (B, C, L) frames (Keras' ConvLSTM1D cell); arguments as
    :class:`ConvLSTMCellNd`'s, ``conv`` an nn.Conv1d.

    >>> cell = ConvLSTMCell1d(3, 8, 5)
    >>> h, c = cell(torch.randn(2, 3, 32))
    """

    spatial_dims = 1


class ConvLSTMCell(ConvLSTMCellNd):
    """One ConvLSTM step over (B, C, H, W) frames, a drop-in for the popular cell (also named
    ``ConvLSTMCell2d``); arguments as :class:`ConvLSTMCellNd`'s (kernel_size and dilation: an
    int or (kh, kw)), ``conv`` an nn.Conv2d.

    >>> cell = ConvLSTMCell(3, 8, 3)
    >>> h, c = cell(torch.randn(2, 3, 16, 16), cell.init_hidden(2, (16, 16)))
    """

    spatial_dims = 2


class ConvLSTMCell3d(ConvLSTMCellNd):
    """One ConvLSTM step over (B, C, D, H, W) frames (Keras' ConvLSTM3D cell); arguments as
    :class:`ConvLSTMCellNd`'s, ``conv`` an nn.Conv3d.

    >>> cell = ConvLSTMCell3d(2, 4, 3)
    >>> h, c = cell(torch.randn(1, 2, 4, 6, 6))
    """

    spatial_dims = 3


ConvLSTMCell2d = ConvLSTMCell
