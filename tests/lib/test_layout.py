"""layout.cat_channels: the [x, h] concatenation in the frames' layout, whatever a one-channel
input's strides say."""

import torch

from triton_convlstm.layout import cat_channels


def _channels_last(t):
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def test_a_one_channel_input_is_concatenated_channels_last_in_2d():
    x = torch.randn(2, 1, 5, 6)  # contiguous: for one channel, torch.cat would follow it
    h = _channels_last(torch.randn(2, 4, 5, 6))
    assert not torch.cat([x, h], 1).is_contiguous(memory_format=torch.channels_last)
    got = cat_channels(x, h)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, torch.cat([x, h], 1))


def test_3d_frames_on_the_cpu_stay_channels_first():
    x, h = torch.randn(2, 1, 3, 4, 5), torch.randn(2, 4, 3, 4, 5)
    got = cat_channels(x, h)
    assert got.is_contiguous() and torch.equal(got, torch.cat([x, h], 1))


def test_inputs_autograd_tracks_get_a_differentiable_concatenation():
    x = torch.randn(2, 1, 5, 6, requires_grad=True)
    h = _channels_last(torch.randn(2, 4, 5, 6))
    got = cat_channels(x, h)
    got.sum().backward()
    assert torch.equal(got.detach(), torch.cat([x.detach(), h], 1))
    assert torch.equal(x.grad, torch.ones_like(x))
