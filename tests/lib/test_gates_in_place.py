"""Training keeps the saved gates in the input convolution's own output (no second
(T, B, 4*hid, H, W) buffer and no copy), whatever the batch size: at B=1 a plain unflatten gives
the size-1 batch axis a stride other than empty_seq's, which once made the forward fall back to a
second buffer."""

import pytest
import torch

from conftest import DEVICE, DEVICE_MARKS
from triton_convlstm.apps.bench.memory import TensorMemoryTracker
from triton_convlstm.layout import empty_seq
from triton_convlstm.sequence import LayerSpec, layer_forward

pytestmark = DEVICE_MARKS


def _args(t, b):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, b, 3, 5, 6, generator=g).to(DEVICE)
    w = torch.randn(4 * 4, 3 + 4, 3, 3, generator=g).to(DEVICE)
    bias = torch.randn(4 * 4, generator=g).to(DEVICE)
    return x, w, bias


# The Triton path: it always runs the split convolutions (the torch path on CPU may not).
@pytest.mark.parametrize("batch", [1, 2])
def test_training_forward_gates_live_in_the_input_convolution_output(batch, conv_outputs):
    convs = conv_outputs
    x, w, bias = _args(4, batch)
    spec = LayerSpec((1, 1), "triton")
    _, _, _, z_seq = layer_forward(x, w, bias, None, None, None, spec, True)
    assert z_seq.stride() == empty_seq(*z_seq.shape, dtype=z_seq.dtype, device="meta").stride()
    # The input convolution: the one over all T*B frames at once.
    (zx_all,) = [c for c in convs if c.shape[0] == 4 * batch]
    assert z_seq.untyped_storage().data_ptr() == zx_all.untyped_storage().data_ptr()


def test_batch1_training_forward_peak_is_not_one_gate_buffer_higher():
    """Same frame count (T*B = 4) and gate bytes: B=1 must not peak a whole z_seq higher."""
    def peak(t, b):
        x, w, bias = _args(t, b)
        with TensorMemoryTracker() as mem:
            out = layer_forward(x, w, bias, None, None, None, LayerSpec((1, 1), "triton"), True)
        return mem.peak_bytes, out[3].numel() * out[3].element_size()

    p1, z_bytes = peak(4, 1)
    p2, _ = peak(2, 2)
    assert p1 - p2 < z_bytes // 2, (p1, p2, z_bytes)
