"""Triton kernels (installed as ``triton_convlstm.kernels``):

- :mod:`.gates`: the gate/state update, forward and backward, on pre-computed convolutions.
- :mod:`.fused_step`: one whole step forward (implicit-GEMM convolution plus the update).
- :mod:`._common`: what both share: the jitted cell math and the launchers' argument plumbing.

Nothing is imported here, so ``import triton_convlstm.kernels`` works without Triton.
"""
