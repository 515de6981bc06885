"""triton_convlstm: a drop-in ConvLSTM for PyTorch with Triton gate kernels.

>>> from triton_convlstm import ConvLSTM
>>> m = ConvLSTM(3, 16, 3, num_layers=2, batch_first=True)

Public names: the layers :class:`ConvLSTM1d`, :class:`ConvLSTM` (``ConvLSTM2d``),
:class:`ConvLSTM3d`, their cells :class:`ConvLSTMCell1d`, :class:`ConvLSTMCell`
(``ConvLSTMCell2d``), :class:`ConvLSTMCell3d`, :func:`gate_update`, ``__version__``.

The library, from the modules down to the kernels (each module one job):

- ``__main__``: ``python -m triton_convlstm demo | bench | info`` (the apps, imported lazily).
- ``modules``: the layers (1-d, 2-d, 3-d, bidirectional): parameters, checks; no math.
- ``cells``: the cells (1-d, 2-d, 3-d): parameters, init, checks; no math.
- ``validation``: argument and input checks with clear errors.
- ``lengths``: variable-length batches: the lengths' checks, per-sample reversal and last
  step, PackedSequence in and out.
- ``dropout``: variational dropout's per-call masks and the rates' checks.
- ``backend``: which implementation runs; the Triton import probe; export detection.
- ``layer_op``: a whole layer over a whole sequence as one torch op (and its autograd).
- ``step_op``: the single-step op: the gate update as torch ops, and cell_step.
- ``export``: for exporters only: the time loop step by step in standard ops.
- ``step_by_step``: when a layer calls its cells step by step (hooks and the like), and how.
- ``quick_step``: the common one-frame CPU call (streaming), recognised in a few comparisons.
- ``graphs``: the CUDA-graph cache, its entries' interface and the capture policy.
- ``sequence``: one layer over a whole sequence: the forward and backward time loops.
- ``gate_buffer``: CPU saved gates, marked so that a compiled backward overwrites them once.
- ``gate_launchers``: the gate update with one calling convention: Triton's or plain torch's.
- ``native_gates``: the CPU gate update, forward and backward, by the C kernels (``csrc/gates.c``).
- ``native_conv``: small 1-d/3-d CPU convolutions and their gradients as C columns and products.
- ``native_step``: a whole inference step (columns or Winograd, sgemm, gates) in one C call.
- ``native_frame``: the one-frame CPU call (cell, layer T=1) by native_step's step.
- ``native_winograd``: 3x3 CPU convolutions (steps, input gradients) by Winograd's F(2x2, 3x3).
- ``native_build``: builds those kernels on first use (system C compiler), caches, loads them.
- ``conv``: same-padded convolutions and their aten gradients.
- ``reference``: the gate/state math in plain torch, written once.
- ``layout``: every memory-layout helper.
- ``kernels``: the Triton kernels (``_common``: shared jitted math and launcher checks;
  ``gates``: gate update forward and backward; ``fused_step``: convolution and gates in one).
- ``keras_weights``: Keras ConvLSTM1D/2D/3D (and Bidirectional) weights as a state_dict.
- ``apps``: the demo and the bench command; never imported by the library.
"""

from .modules import (
    ConvLSTM,
    ConvLSTM1d,
    ConvLSTM2d,
    ConvLSTM3d,
    ConvLSTMCell,
    ConvLSTMCell1d,
    ConvLSTMCell2d,
    ConvLSTMCell3d,
)
from .step_op import gate_update

__all__ = ["ConvLSTM", "ConvLSTM1d", "ConvLSTM2d", "ConvLSTM3d", "ConvLSTMCell",
           "ConvLSTMCell1d", "ConvLSTMCell2d", "ConvLSTMCell3d", "gate_update"]
__version__ = "0.1.0"
