"""triton_convlstm: a drop-in ConvLSTM for PyTorch with Triton gate kernels.

>>> from triton_convlstm import ConvLSTM
>>> m = ConvLSTM(3, 16, 3, num_layers=2, batch_first=True)

Public names: :class:`ConvLSTM`, :class:`ConvLSTMCell`, :func:`gate_update`, ``__version__``.

The library, from the modules down to the kernels (each module one job):

- ``__main__``: ``python -m triton_convlstm demo | bench | info`` (the apps, imported lazily).
- ``modules``: ConvLSTM, ConvLSTMCell: parameters, init, checks; no math, no graph policy.
- ``validation``: argument and input checks with clear errors.
- ``backend``: which implementation runs; the Triton import probe; export detection.
- ``layer_op``: a whole layer over a whole sequence as one torch op (and its autograd).
- ``step_op``: the single-step op: the gate update as torch ops, and cell_step.
- ``export``: for exporters only: the time loop step by step in standard ops.
- ``step_by_step``: when a layer calls its cells step by step (hooks and the like), and how.
- ``graphs``: the CUDA-graph cache, its entries' interface and the capture policy.
- ``sequence``: one layer over a whole sequence: the forward and backward time loops.
- ``gate_launchers``: the gate update with one calling convention: Triton's or plain torch's.
- ``conv``: same-padded convolutions and their aten gradients.
- ``reference``: the gate/state math in plain torch, written once.
- ``layout``: every memory-layout helper.
- ``kernels``: the Triton kernels (``_common``: shared jitted math and launcher checks;
  ``gates``: gate update forward and backward; ``fused_step``: convolution and gates in one).
- ``apps``: the demo and the bench command; never imported by the library.
"""

from .modules import ConvLSTM, ConvLSTMCell
from .step_op import gate_update

__all__ = ["ConvLSTM", "ConvLSTMCell", "gate_update"]
__version__ = "0.1.0"
