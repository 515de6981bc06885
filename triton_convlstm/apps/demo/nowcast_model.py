"""An encoder-forecaster nowcasting model built from :class:`triton_convlstm.ConvLSTM`.

The layout follows Shi et al. 2015 ("Convolutional LSTM Network: a machine learning approach for
precipitation nowcasting"): frames are cut into non-overlapping patches (space-to-depth), an
encoder ConvLSTM reads the observed frames, a forecaster ConvLSTM starts from the encoder's final
(h, c) of every layer and unrolls over the future steps, and a 1x1 convolution over all forecaster
layers' hidden states predicts the future frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...modules import ConvLSTM


class NowcastModel(nn.Module):
    """Predict ``out_frames`` future frames from a sequence of observed frames.

    forward(x): x (B, T_in, C, H, W) in [0, 1] -> (B, out_frames, C, H, W) in (0, 1).

    Args:
        channels: image channels C.
        hidden: ConvLSTM hidden channels (every layer).
        num_layers: depth of the encoder and of the forecaster.
        kernel_size: ConvLSTM kernel size (both ConvLSTMs).
        patch: space-to-depth factor; H and W must be divisible by it (the recurrent layers run
            on (H/patch, W/patch) grids with C*patch**2 input channels, which is what keeps the
            demo fast on a CPU).
        out_frames: future frames predicted.
        backend: passed to ConvLSTM ("auto", "torch", "triton").
    """

    def __init__(self, channels: int = 1, hidden: int = 16, num_layers: int = 2,
                 kernel_size: int = 3, patch: int = 2, out_frames: int = 10,
                 backend: str = "auto") -> None:
        super().__init__()
        self.channels, self.patch, self.out_frames = channels, patch, out_frames
        cells = channels * patch * patch
        common = dict(batch_first=True, return_all_layers=True, backend=backend)
        self.encoder = ConvLSTM(cells, hidden, kernel_size, num_layers, **common)
        self.forecaster = ConvLSTM(cells, hidden, kernel_size, num_layers, **common)
        self.head = nn.Conv2d(num_layers * hidden, cells, kernel_size=1)
        # Start near the (mostly black) background instead of sigmoid(0) = 0.5 grey everywhere:
        # the first hundred steps then go into motion rather than into learning the mean.
        nn.init.constant_(self.head.bias, -2.5)

    def _to_patches(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        return F.pixel_unshuffle(x.reshape(b * t, *x.shape[2:]), self.patch).reshape(
            b, t, -1, x.shape[-2] // self.patch, x.shape[-1] // self.patch)

    def forward(self, x: Tensor) -> Tensor:
        """Encode the observed frames, then unroll the forecaster over the future steps.

        Args:
            x: (B, T_in, C, H, W) in [0, 1], C = channels, H and W divisible by patch.

        Returns:
            (B, out_frames, C, H, W) predicted frames in (0, 1).

        Raises:
            ValueError: for another channel count, or H or W not divisible by patch.
        """
        b, _, c, h, w = x.shape
        if c != self.channels or h % self.patch or w % self.patch:
            raise ValueError(f"expected (B, T, {self.channels}, H, W) with H, W divisible by "
                             f"{self.patch}, got {tuple(x.shape)}")
        patches = self._to_patches(x)  # (B, T_in, C*p*p, H/p, W/p)
        _, states = self.encoder(patches)
        # The forecaster sees the last observed frame at every step (a cheap skip connection the
        # gates can use or ignore) and continues from the encoder's (h, c) of every layer.
        last = patches[:, -1:].expand(-1, self.out_frames, -1, -1, -1).contiguous()
        outputs, _ = self.forecaster(last, hidden_state=states)
        # outputs: per layer (B, T_out, hidden, H/p, W/p), possibly non-contiguous views.
        feats = torch.cat([o.reshape(b * self.out_frames, *o.shape[2:]) for o in outputs], dim=1)
        logits = F.pixel_shuffle(self.head(feats), self.patch)  # (B*T_out, C, H, W)
        return torch.sigmoid(logits).reshape(b, self.out_frames, c, h, w)
