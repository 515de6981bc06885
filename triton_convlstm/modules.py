"""The layers: stacked ConvLSTMs in 1, 2 and 3 spatial dims, one- or bidirectional. Parameters,
init, argument and shape checks; no math and no graph policy here.

Parameters and state_dict match the popular ConvLSTM (``cell_list.{l}.conv.weight`` of shape
(4*hidden, in + hidden, *k), gates i, f, o, g), so its checkpoints load unchanged; a
bidirectional layer adds ``cell_list_reverse.{l}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import dropout as dropout_masks
from . import graphs, validation
from .backend import check_backend_name, exporting, resolve_backend
from .cells import (
    ConvLSTMCell,
    ConvLSTMCell1d,
    ConvLSTMCell2d,
    ConvLSTMCell3d,
    ConvLSTMCellNd,
    Size,
    parameter_of,
)
from .conv import PADDING_MODES
from .export import layer_unrolled
from .layer_op import run_layer
from .lengths import check_lengths, last_step, pack_like, reverse_time, unpack, zero_padding
from .quick_step import quick_layer_step
from .step_by_step import layer_by_modules, runs_modules

__all__ = ["ConvLSTM", "ConvLSTM1d", "ConvLSTM2d", "ConvLSTM3d", "ConvLSTMCell",
           "ConvLSTMCell1d", "ConvLSTMCell2d", "ConvLSTMCell3d"]

State = list[Tensor] | tuple[Tensor, Tensor]


def _copy(t: Tensor) -> Tensor:
    return t.clone(memory_format=torch.contiguous_format)


class ConvLSTMNd(nn.Module):
    """A multi-layer ConvLSTM in ``spatial_dims`` dims. Use :class:`ConvLSTM1d`,
    :class:`ConvLSTM` (2-d, also ``ConvLSTM2d``) or :class:`ConvLSTM3d`.

    Args (the first seven as the popular module's; the rest are keyword-only):
        input_dim: channels of x.
        hidden_dim: channels of h and c: one int for every layer or a list with one per layer.
        kernel_size: an int, one per spatial dim ((kh, kw) in 2-d), or a list with one per
            layer; odd and even kernels keep the frame's size (an even one pads one more at
            the end of the dim).
        num_layers: how many layers are stacked.
        batch_first: x is (B, T, C, *spatial) if True, else (T, B, C, *spatial).
        bias: learnable bias on the gate pre-activations.
        return_all_layers: return every layer's outputs and states, not only the last's.
        bidirectional: each layer also runs a reverse cell (``cell_list_reverse.{l}``) from
            t = T-1 down to 0, as ``nn.LSTM(bidirectional=True)`` and Keras' Bidirectional
            (merge_mode="concat"): outputs and states concatenate the two directions along
            channels (2*hidden), and the next layer reads that.
        peephole: add per-channel peepholes (3, hidden) per layer (Shi et al. 2015).
        dilation: an int, one per spatial dim, or one per layer.
        forget_bias: added to the f-gate bias at init (needs bias=True).
        backend: "auto" (Triton kernels on CUDA where Triton imports), "torch" or "triton".
        cuda_graphs: replay each layer's captured time loop on CUDA (graphs.py).
        recompute_gates: training saves only h and c per step and the backward recomputes the
            gates: no (T, B, 4*hidden, *spatial) tensor kept between forward and backward, for
            about one more forward's worth of convolutions; same results up to rounding.
        fused_forward: experimental, off until measured on a GPU: with the Triton backend, each
            2-d forward step is one kernel, the convolution of [x_t, h] with the gate update
            fused into it (kernels/fused_step.py); the backward is the split path's. Other
            backends, 1-d and 3-d layers, padding modes other than "zeros", calls with
            lengths and recurrent dropout in training ignore it.
        padding_mode: "zeros", "reflect", "replicate" or "circular" (as nn.Conv{n}d's), one for
            every layer or a list with one per layer; set on each cell's ``conv``, where a later
            change is honoured too. "circular" wraps around (longitude on a global grid).
        dropout, recurrent_dropout: variational dropout (Gal & Ghahramani; Keras' ConvLSTM
            layers' ``dropout`` and ``recurrent_dropout``): one rate in [0, 1] or a list with
            one per layer. In training mode every call draws, per layer and direction, one
            mask per sample (B, channels, *spatial), Bernoulli(1 - p) / (1 - p), and uses it
            at every step: on the layer's input, and on the h that feeds the recurrent
            convolution (the h returned is not masked). Nothing in eval mode.

    Raises:
        TypeError, ValueError: naming the invalid argument.

    Call: ``layer_outputs, last_states = m(x, hidden_state=None)`` with x (B, T, C, *spatial)
    if batch_first else (T, B, C, *spatial); layer_outputs is a list of contiguous (B, T,
    hidden, *spatial) tensors (2*hidden if bidirectional), last_states a list of [h, c], h in
    x's dtype and c in float32 (float64 for float64 x); both hold the last layer only unless
    return_all_layers. hidden_state: None (zeros) or one (h, c) per layer, each (B, hidden,
    *spatial) (2*hidden if bidirectional: the forward direction's half first); passing a
    one-directional run's last_states (return_all_layers=True) continues the sequence exactly
    (a bidirectional layer's reverse half only starts the reverse cell: the reverse direction
    reads the chunk's end first). lengths: see :meth:`forward`.
    """

    spatial_dims = 2
    cell_class: type[ConvLSTMCellNd] = ConvLSTMCell

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int | Sequence[int],
        kernel_size: Size | Sequence[Size],
        num_layers: int,
        batch_first: bool = False,
        bias: bool = True,
        return_all_layers: bool = False,
        *,
        bidirectional: bool = False,
        peephole: bool = False,
        dilation: Size | Sequence[Size] = 1,
        forget_bias: float = 0.0,
        backend: str = "auto",
        cuda_graphs: bool = True,
        recompute_gates: bool = False,
        fused_forward: bool = False,
        padding_mode: str | Sequence[str] = "zeros",
        dropout: float | Sequence[float] = 0.0,
        recurrent_dropout: float | Sequence[float] = 0.0,
    ) -> None:
        super().__init__()
        n = self.spatial_dims
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
        kernels = validation.per_layer("kernel_size", kernel_size, num_layers, n=n)
        dilations = validation.per_layer("dilation", dilation, num_layers, n=n)
        paddings = validation.per_layer_choice("padding_mode", padding_mode, num_layers,
                                               PADDING_MODES)
        self.input_dim, self.hidden_dim = input_dim, hidden
        self.kernel_size, self.num_layers = kernels, num_layers
        self.batch_first, self.bias = batch_first, bias
        self.return_all_layers = return_all_layers
        self.bidirectional = validation.flag("bidirectional", bidirectional)
        self.backend = backend
        self.cuda_graphs = validation.flag("cuda_graphs", cuda_graphs)
        self.recompute_gates = validation.flag("recompute_gates", recompute_gates)
        self.fused_forward = validation.flag("fused_forward", fused_forward)
        self.dropout = dropout_masks.rates("dropout", dropout, num_layers)
        self.recurrent_dropout = dropout_masks.rates("recurrent_dropout", recurrent_dropout,
                                                     num_layers)
        directions = 2 if self.bidirectional else 1

        def cells():
            return nn.ModuleList(
                self.cell_class(input_dim if i == 0 else directions * hidden[i - 1], hidden[i],
                                kernels[i], bias, peephole=peephole, dilation=dilations[i],
                                backend=backend, padding_mode=paddings[i])
                for i in range(num_layers)
            )

        self.cell_list = cells()
        if self.bidirectional:
            self.cell_list_reverse = cells()
        if forget_bias and bias:
            with torch.no_grad():
                for cell in self._all_cells():
                    cell.conv.bias[cell.hidden_dim : 2 * cell.hidden_dim] += forget_bias

    # Class defaults as well: a whole model pickled before a switch existed still runs.
    recompute_gates = False
    fused_forward = False
    bidirectional = False

    def _all_cells(self) -> list[ConvLSTMCellNd]:
        return [*self.cell_list, *(self.cell_list_reverse if self.bidirectional else [])]

    def forward(
        self, input_tensor: Tensor | PackedSequence, hidden_state: Sequence[State] | None = None,
        lengths: Tensor | Sequence[int] | None = None,
    ) -> tuple[list[Tensor] | list[PackedSequence], list[list[Tensor]]]:
        """The whole sequence through every layer.

        Args:
            input_tensor: (B, T, input_dim, *spatial) if batch_first else (T, B, input_dim,
                *spatial), floating, the parameters' dtype (any float dtype under autocast,
                which sets the compute dtype). Or a ``PackedSequence`` of such frames (as
                ``nn.LSTM`` takes one): then the outputs come back packed the same way, and
                the lengths are the packed ones.
            hidden_state: None (zeros, or the subclass's ``_init_hidden``), or one (h, c) per
                layer, each (B, hidden, *spatial) (2*hidden if bidirectional), h in the compute
                dtype, c in the state dtype (float32; float64 for float64).
            lengths: None (every sample T steps), or each sample's length, 1..T: an integer
                tensor (B,) on any device, or a list of ints. Sample b reads steps
                0..lengths[b]-1: its outputs after them are zeros, its last state is the one
                after step lengths[b]-1, its padded inputs get no gradient, and a reverse
                direction starts at step lengths[b]-1. The values are checked once on the host
                (one synchronisation for a CUDA tensor; none for a list or a CPU tensor);
                under torch.compile the check is skipped (no graph break) and the values are
                clamped into 1..T.

        Returns:
            (layer_outputs, last_states): a list of contiguous (B, T, hidden, *spatial)
            outputs in the compute dtype (2*hidden if bidirectional), and a list of [h, c],
            (B, hidden, *spatial) each, h in the compute dtype and c in the state dtype; the
            last layer's only unless return_all_layers.
        """
        if isinstance(input_tensor, PackedSequence):
            if lengths is not None:
                raise ValueError("lengths: expected None with a PackedSequence input (it "
                                 "carries its own lengths)")
            padded, lengths = unpack(input_tensor, self.batch_first)
            outputs, last = self.forward(padded, hidden_state, lengths)
            return [pack_like(o, lengths, input_tensor) for o in outputs], last
        quick = quick_layer_step(self, input_tensor, hidden_state, lengths,
                                 ConvLSTMCellNd.forward)  # one frame on CPU: streaming
        if quick is not None:
            return quick
        # Argument names as the popular module's, so keyword calls keep working.
        x = input_tensor
        first = parameter_of(self.cell_list[0])  # device and dtype; weights are read once, below
        validation.sequence_input(x, self.input_dim, first, self.batch_first, self.spatial_dims)
        dtype = validation.compute_dtype(x, first)
        seq = x.transpose(0, 1) if self.batch_first else x  # time-major view
        _, b, _, *spatial = seq.shape
        for cell in self._all_cells():
            cell.check_padding("input_tensor", spatial)
        lengths = check_lengths(lengths, b, seq.shape[0], x.device)
        if hidden_state is None and self._own_initial_state():
            hidden_state = self._init_hidden(b, tuple(spatial))  # as the popular module does
        directions = 2 if self.bidirectional else 1
        try:
            states = validation.hidden_state(
                hidden_state, [(b, directions * c.hidden_dim, *spatial) for c in self.cell_list],
                dtype, x.device, cast=validation.autocasting(x),
            )
        except ValueError as exc:
            if not self.bidirectional:
                raise
            raise ValueError(f"{exc}; a bidirectional layer's states have 2*hidden channels, "
                             "the forward direction's half first") from None
        backend = resolve_backend(self.backend, x.device, dtype)
        use_graphs = graphs.capture_plan(self.cuda_graphs, b,
                                         [cell.hidden_dim for cell in self.cell_list], spatial)
        # Held while captured loops' static outputs are read (until _layers' copies): calls
        # from other threads replay the same entries.
        with graphs.exclusive(x, any(use_graphs)):
            return self._layers(zero_padding(seq.to(dtype), lengths), states, backend, dtype,
                                use_graphs, lengths)

    def _own_initial_state(self) -> bool:
        """Whether a subclass defines the zero state (``_init_hidden`` or a cell's
        ``init_hidden`` overridden, a learnable initial state, say): then it is asked, as the
        popular module asks it; else the layer starts from zeros without making them."""
        return type(self)._init_hidden is not ConvLSTMNd._init_hidden or any(
            type(cell).init_hidden is not ConvLSTMCellNd.init_hidden
            for cell in self._all_cells())

    def _init_hidden(self, batch_size: int, image_size: Size) -> list[list[Tensor]]:
        """Zero states per layer, as the popular module's method of this name.

        Args:
            batch_size: B.
            image_size: the frame's sizes ((H, W) in 2-d), or one int for all.

        Returns:
            One [h, c] per layer, as :meth:`ConvLSTMCellNd.init_hidden` returns them
            (bidirectional: the two directions' concatenated along channels).
        """
        states = [list(cell.init_hidden(batch_size, image_size)) for cell in self.cell_list]
        if self.bidirectional:
            reverse = [cell.init_hidden(batch_size, image_size) for cell in
                       self.cell_list_reverse]
            states = [[torch.cat([f, r], 1) for f, r in zip(fwd, rev)]
                      for fwd, rev in zip(states, reverse)]
        return states

    def _layers(self, seq, states, backend, dtype, use_graphs, lengths):
        """Each layer over the time-major sequence in turn: (layer_outputs, last_states)."""
        outputs, last = [], []
        n = len(self.cell_list)
        rates = self._dropout_rates()
        for idx, (h0, c0) in enumerate(states):
            # A captured loop's own output buffers may come back uncloned (this method copies
            # what it returns right away), but not where a later layer may save this one's
            # output, nor where the other direction's replay of a shared entry follows.
            static = (idx == n - 1 or not torch.is_grad_enabled()) and not self.bidirectional
            args = (lengths, rates[idx], backend, dtype, use_graphs[idx], static)
            if not self.bidirectional:
                h_seq, c_last = self._direction(self.cell_list[idx], seq, h0, c0, *args)
                h_last = last_step(h_seq, lengths)
            else:
                h_seq, h_last, c_last = self._both_directions(idx, seq, h0, c0, *args)
            seq = h_seq
            if self.return_all_layers or idx == n - 1:
                # Contiguous (B, T, hidden, ...) and (B, hidden, ...), as the popular module
                # returns: code that calls .view() on them keeps working. Always a copy (the
                # internal buffers are time-major channels-last, and may be a capture's). Each
                # state pair is a list [h, c], as the popular module's.
                outputs.append(_copy(h_seq.transpose(0, 1)))
                last.append([_copy(h_last), _copy(c_last)])
        return outputs, last

    def _dropout_rates(self) -> list[tuple[float, float]]:
        """Each layer's (dropout, recurrent_dropout) in this call: zeros in eval mode.

        Read from the instance's own attributes and checked again (a rate set after
        construction gets the constructor's errors). No class-level default: a subclass's
        own ``self.dropout = nn.Dropout(p)`` (a submodule) must stay visible as what it
        is, and then means no rate here; a model pickled before dropout existed has none.
        """
        n = len(self.cell_list)
        if not self.training:
            return [(0.0, 0.0)] * n
        own = vars(self)
        return list(zip(*(dropout_masks.rates(name, own.get(name, 0.0), n)
                          for name in ("dropout", "recurrent_dropout"))))

    def _both_directions(self, idx, seq, h0, c0, lengths, *args):
        """Layer idx of a bidirectional model: (h_seq, h_last, c_last), the two directions
        concatenated along channels, forward first."""
        half = self.cell_list[idx].hidden_dim
        hf, hr = (None, None) if h0 is None else h0.split(half, dim=1)
        cf, cr = (None, None) if c0 is None else c0.split(half, dim=1)
        h_fwd, c_fwd = self._direction(self.cell_list[idx], seq, hf, cf, lengths, *args)
        h_rev, c_rev = self._direction(self.cell_list_reverse[idx], reverse_time(seq, lengths),
                                       hr, cr, lengths, *args)
        # Output at t: the forward h after x[t] and the reverse h after x[t]; the reverse
        # direction's final state is the one after x[0].
        h_seq = torch.cat([h_fwd, reverse_time(h_rev, lengths)], dim=2)
        return (h_seq, torch.cat([last_step(h_fwd, lengths), last_step(h_rev, lengths)], dim=1),
                torch.cat([c_fwd, c_rev], dim=1))

    def _direction(self, cell, seq, h0, c0, lengths, rates, backend, dtype, use_graphs,
                   static_outputs):
        """One direction of one layer over the sequence: (h_seq, c_last)."""
        # Drawn in this order (input, then recurrent; forward direction first): the tests
        # replay the same masks through the reference.
        x_rate, h_rate = rates
        if x_rate > 0:
            seq = seq * dropout_masks.dropout_mask(x_rate, seq, seq.shape[2])
        h_mask = dropout_masks.dropout_mask(h_rate, seq, cell.hidden_dim) if h_rate > 0 else None
        if runs_modules(cell, ConvLSTMCellNd.forward):  # hooks and the like: step_by_step.py
            return layer_by_modules(cell, seq, h0, c0, lengths, h_mask)
        # Read once per call: a parametrized weight is computed when read.
        weight, bias, peep = validation.cast_params(cell.conv.weight, cell.conv.bias,
                                                    cell.peephole, dtype)
        save = torch.is_grad_enabled() and any(
            p is not None and p.requires_grad for p in (seq, weight, bias, peep, h0, c0)
        )
        padding_mode = cell.conv.padding_mode  # read per call: a later change is honoured
        if exporting():  # standard ops only, step by step (see export.py)
            return layer_unrolled(seq, weight, bias, peep, h0, c0, cell.dilation, padding_mode,
                                  lengths, h_mask)
        h_seq, c_last, _, _ = run_layer(
            seq, weight, bias, peep, h0, c0, cell.dilation, backend, save, use_graphs,
            keep_gates=not self.recompute_gates, fused=self.fused_forward,
            padding_mode=padding_mode, lengths=lengths, recurrent_mask=h_mask,
            slot=graphs.owner_slot(cell, use_graphs, seq), static_outputs=static_outputs,
        )
        return h_seq, c_last

    def extra_repr(self) -> str:
        """The constructor arguments ``print(module)`` shows besides the cells'."""
        extra = ", bidirectional=True" if self.bidirectional else ""
        for name in ("dropout", "recurrent_dropout"):
            rates = vars(self).get(name)  # as _dropout_rates reads them
            if isinstance(rates, (int, float, list, tuple)) and rates and (
                    not isinstance(rates, (list, tuple)) or any(rates)):
                extra += f", {name}={rates!r}"
        return (f"batch_first={self.batch_first}, return_all_layers={self.return_all_layers}"
                f"{extra}")


class ConvLSTM1d(ConvLSTMNd):
    """A multi-layer ConvLSTM over (B, T, C, L) sequences (Keras' ConvLSTM1D); arguments as
    :class:`ConvLSTMNd`'s, cells :class:`ConvLSTMCell1d`.

    >>> m = ConvLSTM1d(3, 8, 5, num_layers=2, batch_first=True, bidirectional=True)
    >>> outs, states = m(torch.randn(2, 6, 3, 32))
    >>> outs[0].shape
    torch.Size([2, 6, 16, 32])
    """

    spatial_dims = 1
    cell_class = ConvLSTMCell1d


class ConvLSTM(ConvLSTMNd):
    """A multi-layer ConvLSTM over (B, T, C, H, W) sequences, a drop-in for the popular PyTorch
    module (also named ``ConvLSTM2d``); arguments as :class:`ConvLSTMNd`'s (kernel_size and
    dilation: an int, (kh, kw), or a list with one per layer), cells :class:`ConvLSTMCell`.

    >>> m = ConvLSTM(3, [16, 8], 3, num_layers=2, batch_first=True)
    >>> outs, states = m(torch.randn(2, 5, 3, 16, 16))
    >>> outs[0].shape
    torch.Size([2, 5, 8, 16, 16])
    """

    spatial_dims = 2
    cell_class = ConvLSTMCell


class ConvLSTM3d(ConvLSTMNd):
    """A multi-layer ConvLSTM over (B, T, C, D, H, W) sequences (Keras' ConvLSTM3D; volumes in
    time); arguments as :class:`ConvLSTMNd`'s, cells :class:`ConvLSTMCell3d`.

    >>> m = ConvLSTM3d(2, 4, 3, num_layers=1, batch_first=True)
    >>> outs, states = m(torch.randn(1, 3, 2, 4, 6, 6))
    >>> outs[0].shape
    torch.Size([1, 3, 4, 4, 6, 6])
    """

    spatial_dims = 3
    cell_class = ConvLSTMCell3d


ConvLSTM2d = ConvLSTM
