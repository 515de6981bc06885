"""The nn.Modules: parameters, init, argument and shape checks. No math here.

Parameters and state_dict match the popular ConvLSTM (``cell_list.{l}.conv.weight`` of shape
(4*hidden, in + hidden, kh, kw), gates i, f, o, g), so its checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import graphs, validation
from .backend import check_backend_name, exporting, resolve_backend, triton_import_error
from .conv import PADDING_MODES, same_padding
from .export import layer_unrolled
from .layer_op import run_layer
from .reference import state_dtype
from .step_by_step import calls_conv, layer_by_modules, runs_modules
from .step_op import cell_step, gate_update


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step: ``h, c = cell(x, (h, c))``.

    Args:
        input_dim: channels of x.
        hidden_dim: channels of h and c.
        kernel_size: int or (kh, kw); odd and even kernels keep H, W ("same" padding; where the
            total padding dilation*(k-1) is odd, the extra pixel goes at the bottom/right).
        bias: learnable bias on the gate pre-activations.
        peephole: add ``peephole`` (3, hidden): (w_ci, w_cf, w_co) of Shi et al. 2015; the
            output gate reads the new cell.
        dilation: int or (dh, dw).
        backend: "auto" (Triton on CUDA when available), "torch" or "triton".
        padding_mode: "zeros", "reflect", "replicate" or "circular", as nn.Conv2d's (set on
            ``conv``, where a later change is honoured too).

    Raises:
        TypeError, ValueError: naming the invalid argument.

    Shapes: x (B, input_dim, H, W); h (B, hidden, H, W) in x's dtype; c (B, hidden, H, W) in
    float32 (float64 for float64 inputs).

    >>> cell = ConvLSTMCell(3, 8, 3)
    >>> h, c = cell(torch.randn(2, 3, 16, 16), cell.init_hidden(2, (16, 16)))
    """

    def __init__(self, input_dim: int, hidden_dim: int,
                 kernel_size: int | tuple[int, int] | list[int], bias: bool = True, *,
                 peephole: bool = False, dilation: int | tuple[int, int] | list[int] = 1,
                 backend: str = "auto", padding_mode: str = "zeros") -> None:
        super().__init__()
        input_dim = validation.positive_int("input_dim", input_dim)
        hidden_dim = validation.positive_int("hidden_dim", hidden_dim)
        check_backend_name(backend)
        if backend != "torch":
            triton_import_error()  # probe now, eagerly, not while torch.compile traces forward
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.kernel_size = validation.pair("kernel_size", kernel_size)
        self.dilation = validation.pair("dilation", dilation)
        self.bias = validation.drop_in_flag("bias", bias)
        self.backend = backend
        padding_mode = validation.one_of("padding_mode", padding_mode, PADDING_MODES)
        # A plain Conv2d holds the parameters: same names, shapes and default init as the popular
        # module, and the same padding for its odd kernels. The fast path computes from its
        # weight; it is called only where hooks or a changed conv need it (step_by_step.py).
        self.conv = nn.Conv2d(
            input_dim + hidden_dim, 4 * hidden_dim, self.kernel_size, padding=self.conv_padding,
            dilation=self.dilation, bias=self.bias, padding_mode=padding_mode,
        )
        # Zeros: a new peephole model starts as the plain LSTM, and init draws no random numbers,
        # so seeded weights equal the popular module's.
        peephole = validation.flag("peephole", peephole)
        self.peephole = nn.Parameter(torch.zeros(3, hidden_dim)) if peephole else None

    def __setstate__(self, state: dict) -> None:
        """Unpickling a cell saved before its conv took "same" padding for even kernels and
        dilation (it had the popular (kh // 2, kw // 2)): the conv is given the padding it is
        built with now, so such a model keeps the fast path and its results."""
        super().__setstate__(state)
        conv = self._modules.get("conv")
        legacy = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        if isinstance(conv, nn.Conv2d) and conv.padding == legacy != self.conv_padding:
            built = nn.Conv2d(conv.in_channels, conv.out_channels, self.kernel_size,
                              padding=self.conv_padding, dilation=self.dilation, device="meta")
            conv.padding = built.padding
            conv._reversed_padding_repeated_twice = built._reversed_padding_repeated_twice

    def extra_repr(self) -> str:
        """The constructor arguments ``print(module)`` shows."""
        return (f"{self.input_dim}, {self.hidden_dim}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, peephole={self.peephole is not None}, "
                f"backend={self.backend!r}")

    def init_hidden(self, batch_size: int,
                    image_size: int | tuple[int, int] | list[int]) -> tuple[Tensor, Tensor]:
        """Zero states, on the parameters' device, as the popular cell's method of this name.

        Args:
            batch_size: B.
            image_size: (H, W), or one int for both.

        Returns:
            (h, c): zeros of shape (batch_size, hidden, H, W), h in the parameters' dtype, c in
            the state dtype (float32; float64 for float64 parameters).
        """
        batch_size = validation.positive_int("batch_size", batch_size)
        height, width = validation.pair("image_size", image_size)
        w = _parameter_of(self)
        h = torch.zeros(batch_size, self.hidden_dim, height, width, device=w.device, dtype=w.dtype)
        return h, torch.zeros_like(h, dtype=state_dtype(w.dtype))

    @property
    def conv_padding(self) -> tuple[int, int] | str:
        """The padding ``conv`` is built with: (top, left) where "same" padding is symmetric
        (odd kernels: (kh // 2, kw // 2) without dilation, as the popular module), else
        "same" (nn.Conv2d then pads the extra pixel at the bottom/right, as conv.same_padding)."""
        left, right, top, bottom = same_padding(self.kernel_size, self.dilation)
        return (top, left) if left == right and top == bottom else "same"

    def check_padding(self, name: str, height: int, width: int) -> None:
        """A clear error where frames of H x W are too small for the conv's padding_mode."""
        mode = getattr(self.conv, "padding_mode", "zeros")  # a replaced conv may have none
        if mode in ("reflect", "circular"):  # the others pad any size
            validation.padding_fits(name, mode, same_padding(self.kernel_size, self.dilation),
                                    height, width)

    @property
    def padding(self) -> tuple[int, int]:
        """The popular cell's attribute: (kh // 2, kw // 2), "same" for odd kernels (even ones
        pad one more at the bottom/right here; see conv.same_padding)."""
        return self.kernel_size[0] // 2, self.kernel_size[1] // 2

    def forward(self, input_tensor: Tensor,
                cur_state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """One step. (Argument names as the popular cell's, so keyword calls keep working.)

        Args:
            input_tensor: (B, input_dim, H, W), floating, the parameters' dtype (any float
                dtype under autocast, which sets the compute dtype).
            cur_state: (h, c), each (B, hidden, H, W), h in the compute dtype, c in the state
                dtype (float32; float64 for float64); or None (zeros).

        Returns:
            (h, c): the new states, (B, hidden, H, W) each, h in the compute dtype, c in the
            state dtype.
        """
        x = input_tensor
        plain = not calls_conv(self)
        # The weight is read once a step: a parametrized one is computed when read.
        like = self.conv.weight if plain else _parameter_of(self)
        validation.frame_input(x, self.input_dim, like)
        dtype = validation.compute_dtype(x, like)
        b, _, height, width = x.shape
        self.check_padding("input_tensor", height, width)
        if cur_state is None:
            h, c = self.init_hidden(b, (height, width))
            h, c = h.to(dtype), c.to(state_dtype(dtype))
        else:
            h, c = validation.state_pair(
                "cur_state", cur_state, (b, self.hidden_dim, height, width), dtype, x.device,
                cast=validation.autocasting(x),
            )
        if not plain:  # called as a module: its hooks run, its own padding and forward apply
            z = self.conv(torch.cat([x.to(dtype), h], dim=1))
            peep = None if self.peephole is None else self.peephole.to(state_dtype(dtype))
            return gate_update(z, c, peephole=peep, backend=self.backend)
        weight, bias, peep = validation.cast_params(like, self.conv.bias, self.peephole, dtype)
        return cell_step(x if x.dtype == dtype else x.to(dtype), h, c, weight, bias, peep,
                         self.dilation, self.backend, padding_mode=self.conv.padding_mode)


def _parameter_of(cell: nn.Module) -> Tensor:
    """A parameter of the cell's convolution, for its device and dtype without reading
    ``conv.weight`` (a parametrized weight is computed when read)."""
    return next(cell.conv.parameters())


def _copy(t: Tensor) -> Tensor:
    return t.clone(memory_format=torch.contiguous_format)


class ConvLSTM(nn.Module):
    """A multi-layer ConvLSTM, a drop-in for the popular PyTorch module.

    Args (the first seven as the popular module's; the rest are keyword-only):
        input_dim: channels of x.
        hidden_dim: channels of h and c: one int for every layer or a list with one per layer.
        kernel_size: an int, (kh, kw), or a list with one per layer; odd and even kernels keep
            H and W (an even one pads one more at the bottom/right).
        num_layers: how many layers are stacked.
        batch_first: x is (B, T, C, H, W) if True, else (T, B, C, H, W).
        bias: learnable bias on the gate pre-activations.
        return_all_layers: return every layer's outputs and states, not only the last's.
        peephole: add per-channel peepholes (3, hidden) per layer (Shi et al. 2015).
        dilation: an int, (dh, dw) or one per layer.
        forget_bias: added to the f-gate bias at init (needs bias=True).
        backend: "auto" (Triton kernels on CUDA where Triton imports), "torch" or "triton".
        cuda_graphs: replay each layer's captured time loop on CUDA (graphs.py).
        recompute_gates: training saves only h and c per step and the backward recomputes the
            gates: no (T, B, 4*hidden, H, W) tensor kept between forward and backward, for about
            one more forward's worth of convolutions; same results up to convolution rounding.
        fused_forward: experimental, off until measured on a GPU: with the Triton backend, each
            forward step is one kernel, the convolution of [x_t, h] with the gate update fused
            into it (kernels/fused_step.py); the backward is the split path's. Other backends
            and padding modes other than "zeros" ignore it.
        padding_mode: "zeros", "reflect", "replicate" or "circular" (as nn.Conv2d's), one for
            every layer or a list with one per layer; set on each cell's ``conv``, where a later
            change is honoured too. "circular" wraps around (longitude on a global grid).

    Raises:
        TypeError, ValueError: naming the invalid argument.

    Call: ``layer_outputs, last_states = m(x, hidden_state=None)`` with x (B, T, C, H, W) if
    batch_first else (T, B, C, H, W); layer_outputs is a list of contiguous (B, T, hidden, H, W)
    tensors, last_states a list of (h, c), h in x's dtype and c in float32 (float64 for float64
    x); both hold the last layer only unless return_all_layers. hidden_state: None (zeros) or
    one (h, c) per layer, each (B, hidden, H, W); passing a run's last_states
    (return_all_layers=True) continues the sequence exactly.

    >>> m = ConvLSTM(3, [16, 8], 3, num_layers=2, batch_first=True)
    >>> outs, states = m(torch.randn(2, 5, 3, 16, 16))
    >>> outs[0].shape
    torch.Size([2, 5, 8, 16, 16])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int | Sequence[int],
        kernel_size: int | tuple[int, int] | Sequence[int | tuple[int, int] | list[int]],
        num_layers: int,
        batch_first: bool = False,
        bias: bool = True,
        return_all_layers: bool = False,
        *,
        peephole: bool = False,
        dilation: int | tuple[int, int] | Sequence[int | tuple[int, int] | list[int]] = 1,
        forget_bias: float = 0.0,
        backend: str = "auto",
        cuda_graphs: bool = True,
        recompute_gates: bool = False,
        fused_forward: bool = False,
        padding_mode: str | Sequence[str] = "zeros",
    ) -> None:
        super().__init__()
        num_layers = validation.positive_int("num_layers", num_layers)
        input_dim = validation.positive_int("input_dim", input_dim)
        check_backend_name(backend)
        batch_first = validation.drop_in_flag("batch_first", batch_first)
        bias = validation.drop_in_flag("bias", bias)
        return_all_layers = validation.drop_in_flag("return_all_layers", return_all_layers)
        forget_bias = validation.finite_number("forget_bias", forget_bias)
        if forget_bias and not bias:
            raise ValueError(f"forget_bias: expected 0.0 with bias=False, got {forget_bias}")
        hidden = validation.per_layer("hidden_dim", hidden_dim, num_layers, scalar=int)
        kernels = validation.per_layer("kernel_size", kernel_size, num_layers)
        dilations = validation.per_layer("dilation", dilation, num_layers)
        paddings = validation.per_layer_choice("padding_mode", padding_mode, num_layers,
                                               PADDING_MODES)
        self.input_dim, self.hidden_dim = input_dim, hidden
        self.kernel_size, self.num_layers = kernels, num_layers
        self.batch_first, self.bias = batch_first, bias
        self.return_all_layers = return_all_layers
        self.backend = backend
        self.cuda_graphs = validation.flag("cuda_graphs", cuda_graphs)
        self.recompute_gates = validation.flag("recompute_gates", recompute_gates)
        self.fused_forward = validation.flag("fused_forward", fused_forward)
        self.cell_list = nn.ModuleList(
            ConvLSTMCell(input_dim if i == 0 else hidden[i - 1], hidden[i], kernels[i], bias,
                         peephole=peephole, dilation=dilations[i], backend=backend,
                         padding_mode=paddings[i])
            for i in range(num_layers)
        )
        if forget_bias and bias:
            with torch.no_grad():
                for cell in self.cell_list:
                    cell.conv.bias[cell.hidden_dim : 2 * cell.hidden_dim] += forget_bias

    # Class defaults as well: a whole model pickled before a switch existed still runs.
    recompute_gates = False
    fused_forward = False

    def forward(
        self, input_tensor: Tensor, hidden_state: list[tuple[Tensor, Tensor]] | None = None
    ) -> tuple[list[Tensor], list[tuple[Tensor, Tensor]]]:
        """The whole sequence through every layer.

        Args:
            input_tensor: (B, T, input_dim, H, W) if batch_first else (T, B, input_dim, H, W),
                floating, the parameters' dtype (any float dtype under autocast, which sets
                the compute dtype).
            hidden_state: None (zeros), or one (h, c) per layer, each (B, hidden, H, W), h in
                the compute dtype, c in the state dtype (float32; float64 for float64).

        Returns:
            (layer_outputs, last_states): a list of contiguous (B, T, hidden, H, W) outputs in
            the compute dtype, and a list of (h, c), (B, hidden, H, W) each, h in the compute
            dtype and c in the state dtype; the last layer's only unless return_all_layers.
        """
        # Argument names as the popular module's, so keyword calls keep working.
        x = input_tensor
        first = _parameter_of(self.cell_list[0])  # device and dtype; weights are read once, below
        validation.sequence_input(x, self.input_dim, first, self.batch_first)
        dtype = validation.compute_dtype(x, first)
        seq = x.transpose(0, 1) if self.batch_first else x  # time-major view
        _, b, _, height, width = seq.shape
        for cell in self.cell_list:
            cell.check_padding("input_tensor", height, width)
        if hidden_state is None and self._own_initial_state():
            hidden_state = self._init_hidden(b, (height, width))  # as the popular module does
        states = validation.hidden_state(
            hidden_state, [(b, c.hidden_dim, height, width) for c in self.cell_list], dtype,
            x.device, cast=validation.autocasting(x),
        )
        backend = resolve_backend(self.backend, x.device, dtype)
        use_graphs = graphs.capture_plan(self.cuda_graphs, b,
                                         [cell.hidden_dim for cell in self.cell_list], height,
                                         width)
        # Held while captured loops' static outputs are read (until _layers' copies): calls
        # from other threads replay the same entries.
        with graphs.exclusive(x, any(use_graphs)):
            return self._layers(seq.to(dtype), states, backend, dtype, use_graphs)

    def _own_initial_state(self) -> bool:
        """Whether a subclass defines the zero state (``_init_hidden`` or a cell's
        ``init_hidden`` overridden, a learnable initial state, say): then it is asked, as the
        popular module asks it; else the layer starts from zeros without making them."""
        return type(self)._init_hidden is not ConvLSTM._init_hidden or any(
            type(cell).init_hidden is not ConvLSTMCell.init_hidden for cell in self.cell_list)

    def _init_hidden(self, batch_size: int,
                     image_size: int | tuple[int, int] | list[int]) -> list[tuple[Tensor, Tensor]]:
        """Zero states per layer, as the popular module's method of this name.

        Args:
            batch_size: B.
            image_size: (H, W), or one int for both.

        Returns:
            One (h, c) per layer, as :meth:`ConvLSTMCell.init_hidden` returns.
        """
        return [cell.init_hidden(batch_size, image_size) for cell in self.cell_list]

    def _layers(self, seq, states, backend, dtype, use_graphs):
        """Each layer over the time-major sequence in turn: (layer_outputs, last_states)."""
        outputs, last = [], []
        n = len(self.cell_list)
        for idx, (cell, (h0, c0)) in enumerate(zip(self.cell_list, states)):
            if runs_modules(cell, ConvLSTMCell.forward):  # hooks and the like: step_by_step.py
                h_seq, c_last = layer_by_modules(cell, seq, h0, c0)
            else:
                # A captured loop's own output buffers may come back uncloned (this method
                # copies what it returns right away), but not where a later layer may save
                # this one's output.
                static = idx == n - 1 or not torch.is_grad_enabled()
                h_seq, c_last = self._layer(cell, seq, h0, c0, backend, dtype, use_graphs[idx],
                                            static)
            seq = h_seq
            if self.return_all_layers or idx == n - 1:
                # Contiguous (B, T, hidden, H, W) and (B, hidden, H, W), as the popular module
                # returns: code that calls .view() on them keeps working. Always a copy (the
                # internal buffers are time-major channels_last, and may be a capture's). Each
                # state pair is a list [h, c], as the popular module's.
                outputs.append(_copy(h_seq.transpose(0, 1)))
                last.append([_copy(h_seq[-1]), _copy(c_last)])
        return outputs, last

    def _layer(self, cell, seq, h0, c0, backend, dtype, use_graphs, static_outputs):
        """One layer on the fast path: (h_seq, c_last)."""
        # Read once per call: a parametrized weight is computed when read.
        weight, bias, peep = validation.cast_params(cell.conv.weight, cell.conv.bias,
                                                    cell.peephole, dtype)
        save = torch.is_grad_enabled() and any(
            p is not None and p.requires_grad for p in (seq, weight, bias, peep, h0, c0)
        )
        padding_mode = cell.conv.padding_mode  # read per call: a later change is honoured
        if exporting():  # standard ops only, step by step (see export.py)
            return layer_unrolled(seq, weight, bias, peep, h0, c0, cell.dilation, padding_mode)
        h_seq, c_last, _, _ = run_layer(
            seq, weight, bias, peep, h0, c0, cell.dilation, backend, save, use_graphs,
            keep_gates=not self.recompute_gates, fused=self.fused_forward,
            padding_mode=padding_mode, slot=graphs.owner_slot(cell, use_graphs, seq),
            static_outputs=static_outputs,
        )
        return h_seq, c_last

    def extra_repr(self) -> str:
        """The constructor arguments ``print(module)`` shows besides the cells'."""
        return f"batch_first={self.batch_first}, return_all_layers={self.return_all_layers}"
