"""Triton kernels (installed as ``triton_convlstm.kernels``); see :mod:`.gates`.

Nothing is imported here, so ``import triton_convlstm.kernels`` works without Triton.
"""
