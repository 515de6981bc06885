"""One frame at a time: the streaming use (real-time nowcasting feeds frames as they arrive).

Three ways a user runs it, each a closure over ``frames`` steps with the state carried, in
inference (no_grad): the popular module's cell (:class:`~.baseline.EagerConvLSTMCell`), this
package's cell, and this package's layer called on T=1 chunks (on CUDA each call replays one
captured loop per layer). All load the same weights.

>>> step = build_stream_step("cell", hidden=4, side=8, device=torch.device("cpu"), frames=2)
>>> step()
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .baseline import EagerConvLSTMCell

STREAM_IMPLS = ("popular-cell", "cell", "layer")
# (hidden, side) of the frames: issue 17's two streaming sizes; one input channel, kernel 3.
STREAM_SIZES = {"stream-s": (16, 16), "stream-m": (64, 64)}


def build_stream_step(impl: str, hidden: int, side: int, device: torch.device,
                      frames: int = 20, batch: int = 1, seed: int = 0) -> Callable[[], None]:
    """A closure feeding ``frames`` frames one at a time through ``impl``, the state carried
    from each to the next, under no_grad.

    Args:
        impl: one of STREAM_IMPLS.
        hidden: hidden channels.
        side: the square frame's side.
        device: where the model and frames live.
        frames: steps per call.
        batch: B.
        seed: seeds the weights and the frames.

    Returns:
        The step, a function of no arguments.

    Raises:
        ValueError: for an unknown impl.
    """
    from ...modules import ConvLSTM, ConvLSTMCell

    if impl not in STREAM_IMPLS:
        raise ValueError(f"impl: expected one of {STREAM_IMPLS}, got {impl!r}")
    torch.manual_seed(seed)
    popular = EagerConvLSTMCell(1, hidden, 3)
    video = torch.randn(batch, frames, 1, side, side, device=device)
    zeros = torch.zeros(batch, hidden, side, side, device=device)
    if impl == "layer":
        layer = ConvLSTM(1, hidden, 3, 1, batch_first=True)
        layer.cell_list[0].load_state_dict(popular.state_dict())
        layer.to(device).eval()

        def layer_stream():
            state = None
            with torch.no_grad():
                for t in range(frames):
                    _, state = layer(video[:, t : t + 1], state)

        return layer_stream
    cell = popular if impl == "popular-cell" else ConvLSTMCell(1, hidden, 3, True)
    if cell is not popular:
        cell.load_state_dict(popular.state_dict())
    cell.to(device).eval()

    def cell_stream():
        h, c = zeros, zeros
        with torch.no_grad():
            for t in range(frames):
                h, c = cell(video[:, t], (h, c))

    return cell_stream
