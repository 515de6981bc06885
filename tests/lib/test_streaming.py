"""One frame at a time on CPU: the layer called on T=1 chunks in inference takes the cell's step
(quick_step.py, or layer_op._one_step where that steps aside) and the cell convolves large
frames channels-last (step_op.cell_step); both must give what the whole sequence gives, in the
layouts the popular module returns."""

from __future__ import annotations

import pytest
import torch

from triton_convlstm import ConvLSTM, ConvLSTMCell, layer_op, quick_step


@pytest.mark.parametrize("side", [6, 32], ids=["small", "channels-last"])  # 32*32 >= 1024
@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_t1_chunks_equal_the_whole_sequence(side, padding_mode, monkeypatch):
    steps = []
    for module, name in ((layer_op, "_one_step"), (quick_step, "_step")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, real=real, name=name: steps.append(name) or real(*a))
    torch.manual_seed(0)
    m = ConvLSTM(2, [4, 3], [3, (2, 3)], 2, True, return_all_layers=True, peephole=True,
                 padding_mode=padding_mode).eval()
    with torch.no_grad():
        for cell in m.cell_list:
            cell.peephole.normal_(0, 0.5)
        video = torch.randn(2, 5, 2, side, side)
        whole, whole_states = m(video)
        state, outs = None, []
        for t in range(video.shape[1]):
            out, state = m(video[:, t : t + 1], state)
            outs.append(out)
    # Every frame, every layer took a one-frame step: quick_step's where the state is given
    # and the padding needs no check, layer_op._one_step's otherwise.
    assert len(steps) == 5 * 2
    assert set(steps) == ({"_step"} if padding_mode == "zeros" else {"_one_step"})
    for layer, want in enumerate(whole):
        got = torch.cat([o[layer] for o in outs], dim=1)
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (h, c), (hw, cw) in zip(state, whole_states):
        assert h.is_contiguous() and c.is_contiguous()
        torch.testing.assert_close(h, hw, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, cw, rtol=1e-5, atol=1e-6)


def test_training_and_lengths_keep_the_loop():
    """Only inference takes the one-frame step: a T=1 call that saves for the backward, or
    has lengths, runs the loop (and its gradients)."""
    torch.manual_seed(0)
    m = ConvLSTM(2, 3, 3, 1, True)
    x = torch.randn(2, 1, 2, 5, 5, requires_grad=True)
    out, _ = m(x, lengths=[1, 1])
    out[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("side", [6, 32])
def test_the_cell_returns_contiguous_states_of_the_same_values(side):
    """Large frames are convolved channels-last inside the cell; h and c come back contiguous
    (as the popular cell's) and equal to the layer's one step."""
    torch.manual_seed(1)
    cell = ConvLSTMCell(2, 4, 3, True)
    layer = ConvLSTM(2, 4, 3, 1, True)
    layer.cell_list[0].load_state_dict(cell.state_dict())
    x, h, c = torch.randn(2, 2, side, side), torch.randn(2, 4, side, side), torch.randn(
        2, 4, side, side)
    h1, c1 = cell(x, (h, c))
    assert h1.is_contiguous() and c1.is_contiguous()
    with torch.no_grad():
        out, ((h2, c2),) = layer(x[:, None], [(h, c)])
    torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c1, c2, rtol=1e-5, atol=1e-6)
    h1.sum().backward()  # still differentiable
    assert cell.conv.weight.grad is not None
