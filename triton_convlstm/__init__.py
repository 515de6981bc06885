"""triton_convlstm: a drop-in ConvLSTM for PyTorch with Triton gate kernels.

>>> from triton_convlstm import ConvLSTM
>>> m = ConvLSTM(3, 16, 3, num_layers=2, batch_first=True)
"""

from .modules import ConvLSTM, ConvLSTMCell

__all__ = ["ConvLSTM", "ConvLSTMCell"]
__version__ = "0.1.0"
