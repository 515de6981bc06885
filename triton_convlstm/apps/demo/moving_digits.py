"""Moving-digit sequences generated on the fly from scikit-learn's bundled 8x8 digits.

A small, download-free stand-in for Moving MNIST: 1-2 upscaled digit sprites bounce inside a
square frame. Everything is generated from a seed, so the data is reproducible without storing it:

>>> data = MovingDigits(frame_size=32, split="train", seed=0)
>>> batch = data.batch(step=0, batch_size=8)        # (8, 20, 1, 32, 32) float32 in [0, 1]
>>> inputs, targets = batch[:, :10], batch[:, 10:]

Batch ``k`` comes from its own ``torch.Generator`` seeded with ``(seed, k)``. That makes a batch a
pure function of its index: resuming from a checkpoint needs no data-loader state, and every
DDP rank can build the same global batch and keep its own shard of it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

SPLITS = ("train", "val")
# Large odd constant: mixes (seed, index) into one generator seed without small-seed collisions.
_MIX = 1_000_003


@functools.lru_cache(maxsize=8)
def digit_sprites(sprite_size: int, split: str) -> Tensor:
    """The digit images of one split, upscaled (cached for up to 8 (sprite_size, split) pairs).

    The split is by image index (every 5th image is validation), so train and validation never
    share a digit image, and both contain all ten classes.

    Args:
        sprite_size: side of an upscaled sprite in pixels.
        split: "train" or "val".

    Returns:
        (N, sprite_size, sprite_size) float32 in [0, 1] on the CPU.

    Raises:
        ValueError: for another split.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    from sklearn.datasets import load_digits  # ships inside scikit-learn, no download

    images = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16.0  # (1797, 8, 8)
    keep = torch.arange(len(images)) % 5 == 0
    images = images[keep if split == "val" else ~keep]
    # Bilinear upscaling keeps the strokes smooth; the clamp undoes small overshoots.
    up = F.interpolate(images[:, None], size=(sprite_size, sprite_size), mode="bilinear",
                       align_corners=False)
    return up[:, 0].clamp_(0.0, 1.0).contiguous()


class MovingDigits:
    """Seeded generator of bouncing-digit sequences.

    Args:
        frames: total frames per sequence (inputs + targets), >= 1.
        frame_size: H = W of a frame.
        sprite_size: side of a digit sprite, in [1, frame_size) (defaults to
            frame_size * 3 // 8, at least 4).
        max_digits: each sequence holds 1..max_digits digits, >= 1.
        speed: (min, max) pixels per frame (defaults scale with frame_size: frame_size / 32
            to frame_size / 16).
        split: "train" or "val" (disjoint digit images).
        seed: the data stream.

    Raises:
        ValueError: for frames or max_digits below 1, a sprite_size outside [1, frame_size), or
            an unknown split.
    """

    def __init__(self, frames: int = 20, frame_size: int = 32, sprite_size: int | None = None,
                 max_digits: int = 2, speed: tuple[float, float] | None = None,
                 split: str = "train", seed: int = 0) -> None:
        sprite_size = sprite_size or max(4, frame_size * 3 // 8)
        if frames < 1 or max_digits < 1:
            raise ValueError("frames and max_digits must be >= 1")
        if not 1 <= sprite_size < frame_size:
            raise ValueError(f"sprite_size must be in [1, frame_size), got {sprite_size}")
        self.frames, self.frame_size, self.sprite_size = frames, frame_size, sprite_size
        self.max_digits, self.split, self.seed = max_digits, split, seed
        self.speed = speed or (frame_size / 32.0, frame_size / 16.0)
        self.sprites = digit_sprites(sprite_size, split)

    def generator(self, index: int) -> torch.Generator:
        """The generator batch ``index`` is drawn from (a pure function of seed and index).

        Args:
            index: the batch number.

        Returns:
            A new CPU generator, seeded from (seed, split, index).
        """
        split_salt = SPLITS.index(self.split) + 1
        return torch.Generator().manual_seed((self.seed * _MIX + index) * 7 + split_salt)

    def trajectories(self, batch_size: int, gen: torch.Generator) -> Tensor:
        """Top-left sprite corners bouncing off the frame edges (reflection keeps every sprite
        fully inside the frame).

        Args:
            batch_size: sequences B.
            gen: the generator the start positions, directions and speeds are drawn from.

        Returns:
            (batch_size, max_digits, frames, 2) float (y, x) corners.
        """
        room = float(self.frame_size - self.sprite_size)
        pos = torch.rand(batch_size, self.max_digits, 2, generator=gen) * room
        angle = torch.rand(batch_size, self.max_digits, generator=gen) * (2 * torch.pi)
        lo, hi = self.speed
        speed = lo + torch.rand(batch_size, self.max_digits, generator=gen) * (hi - lo)
        vel = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1) * speed[..., None]
        out = [pos]
        for _ in range(self.frames - 1):
            pos = pos + vel
            # Reflect at the walls: the overshoot is mirrored and the velocity flips.
            low, high = pos < 0, pos > room
            pos = torch.where(low, -pos, torch.where(high, 2 * room - pos, pos))
            vel = torch.where(low | high, -vel, vel)
            out.append(pos)
        return torch.stack(out, dim=2)

    def render(self, corners: Tensor, sprites: Tensor, present: Tensor) -> Tensor:
        """Paint the sprites; overlapping digits combine with max, as in Moving MNIST.

        Args:
            corners: (B, D, T, 2) (y, x) top-left sprite positions (rounded to pixels here).
            sprites: (B, D, s, s) the sprite of each digit, s = sprite_size, on corners' device.
            present: (B, D) bool, which digits are drawn.

        Returns:
            (B, T, 1, H, W) frames, H = W = frame_size, in sprites' dtype.
        """
        s, size = self.sprite_size, self.frame_size
        corner = corners.round().long()  # (B, D, T, 2)
        grid = torch.arange(size, device=corner.device)
        # Offset of every frame row/column inside the sprite; outside [0, s) means "not covered".
        dy = grid.view(1, 1, 1, size) - corner[..., 0:1]  # (B, D, T, H)
        dx = grid.view(1, 1, 1, size) - corner[..., 1:2]  # (B, D, T, W)
        in_y, in_x = (dy >= 0) & (dy < s), (dx >= 0) & (dx < s)
        dy, dx = dy.clamp(0, s - 1), dx.clamp(0, s - 1)
        b, d, t = corner.shape[:3]
        flat = sprites.reshape(b, d, 1, s * s).expand(b, d, t, s * s)
        index = (dy[..., :, None] * s + dx[..., None, :]).reshape(b, d, t, size * size)
        pix = torch.gather(flat, 3, index).reshape(b, d, t, size, size)
        mask = in_y[..., :, None] & in_x[..., None, :] & present[:, :, None, None, None]
        frames = (pix * mask).amax(dim=1)  # (B, T, H, W)
        return frames[:, :, None]

    def sample(self, step: int, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """The random draws of batch ``step``, all from its own CPU generator (so they are the
        same on every device).

        Args:
            step: the batch number.
            batch_size: sequences B.

        Returns:
            (corners, which, present), D = max_digits, T = frames: corners (B, D, T, 2)
            integer-valued float (y, x) top-left sprite positions, which (B, D) sprite indices,
            present (B, D) bool (1..max_digits per row).
        """
        gen = self.generator(step)
        b, d = batch_size, self.max_digits
        which = torch.randint(len(self.sprites), (b, d), generator=gen)
        count = torch.randint(1, d + 1, (b,), generator=gen)
        present = torch.arange(d)[None, :] < count[:, None]
        corners = self.trajectories(b, gen).round()
        return corners, which, present

    def batch(self, step: int, batch_size: int, device: torch.device | str = "cpu") -> Tensor:
        """Batch number ``step``.

        The same (seed, split, step, batch_size) always gives the same values on any device.

        Args:
            step: the batch number.
            batch_size: sequences in the batch.
            device: where the frames are painted and returned.

        Returns:
            (batch_size, frames, 1, H, W) float32 in [0, 1] on ``device``.
        """
        corners, which, present = self.sample(step, batch_size)
        # Only the painting, the costly part for 64x64 frames, runs on ``device``.
        return self.render(corners.to(device), self.sprites[which].to(device), present.to(device))

    def fixed_set(self, size: int, batch_size: int = 64) -> Tensor:
        """A fixed evaluation set: batches 0, 1, ... concatenated.

        Args:
            size: sequences in the set.
            batch_size: sequences per generated batch (the last one may be smaller).

        Returns:
            (size, frames, 1, H, W) float32 in [0, 1] on the CPU.
        """
        parts = [self.batch(i, min(batch_size, size - start))
                 for i, start in enumerate(range(0, size, batch_size))]
        return torch.cat(parts)


def copy_last_frame_mse(inputs: Tensor, targets: Tensor) -> Tensor:
    """MSE of the copy-last-frame baseline: every future frame predicted as the last input.

    Args:
        inputs: (B, Tin, C, H, W) observed frames.
        targets: (B, Tout, C, H, W) true future frames.

    Returns:
        A scalar float32 tensor.
    """
    return F.mse_loss(inputs[:, -1:].float().expand_as(targets), targets.float())
