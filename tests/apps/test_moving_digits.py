"""The moving-digit data: shapes, range, reproducibility, and that digits move and bounce."""

import pytest
import torch

from triton_convlstm.apps.demo.moving_digits import MovingDigits, copy_last_frame_mse, digit_sprites


def test_shapes_dtype_and_range():
    data = MovingDigits(frames=20, frame_size=32, split="train", seed=0)
    batch = data.batch(0, 6)
    assert batch.shape == (6, 20, 1, 32, 32)
    assert batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1
    assert batch.amax(dim=(1, 2, 3, 4)).min() > 0.5  # every sequence shows a digit
    assert data.fixed_set(10, batch_size=4).shape == (10, 20, 1, 32, 32)


def test_same_seed_same_data_other_seed_other_data():
    a = MovingDigits(frame_size=24, seed=3).batch(5, 4)
    assert torch.equal(a, MovingDigits(frame_size=24, seed=3).batch(5, 4))
    assert not torch.equal(a, MovingDigits(frame_size=24, seed=4).batch(5, 4))
    assert not torch.equal(a, MovingDigits(frame_size=24, seed=3).batch(6, 4))
    assert not torch.equal(a, MovingDigits(frame_size=24, split="val", seed=3).batch(5, 4))
    # A batch depends only on its index, not on what was drawn before (resume, DDP shards).
    data = MovingDigits(frame_size=24, seed=3)
    data.batch(0, 4)
    assert torch.equal(data.batch(5, 4), a)


def test_train_and_validation_use_disjoint_digit_images():
    train, val = digit_sprites(8, "train"), digit_sprites(8, "val")
    assert len(train) + len(val) == 1797 and len(val) > 300
    same = (train[:, None] == val[None]).flatten(2).all(-1)  # exact duplicates across splits
    # sklearn's digits hold a few byte-identical images; the split itself never shares an index.
    assert same.sum() <= 5
    with pytest.raises(ValueError, match="split"):
        digit_sprites(8, "test")


def test_digits_move_and_bounce_inside_the_frame():
    data = MovingDigits(frames=60, frame_size=32, max_digits=1, seed=1)
    gen = data.generator(0)
    corners = data.trajectories(64, gen)  # (64, 1, 60, 2)
    room = data.frame_size - data.sprite_size
    assert corners.min() >= 0 and corners.max() <= room
    steps = corners.diff(dim=2)
    assert steps.abs().amax(-1).min() > 0  # always moving
    # Over 60 frames at >= 1 px/frame across 20 px of room every digit hits a wall: the
    # velocity along some axis reverses.
    flips = (steps[:, :, 1:] * steps[:, :, :-1] < 0).any(-1).any(-1)
    assert flips.all()

    batch = data.batch(0, 16)[:, :, 0]  # (16, 60, 32, 32), one digit each
    # Never clipped by the border: each frame shows the whole sprite, so its ink is constant.
    ink = batch.sum((-1, -2))
    torch.testing.assert_close(ink, ink[:, :1].expand_as(ink))
    # The digit's centre of mass travels.
    ys = torch.arange(32.0)
    cy = (batch.sum(-1) * ys).sum(-1) / ink
    cx = (batch.sum(-2) * ys).sum(-1) / ink
    travel = (cy.amax(1) - cy.amin(1)) + (cx.amax(1) - cx.amin(1))
    assert travel.min() > 5


def test_one_or_two_digits():
    data = MovingDigits(frames=2, frame_size=32, max_digits=2, seed=0)
    _, which, present = data.sample(0, 64)
    assert set(present.sum(1).tolist()) == {1, 2}
    assert present[:, 0].all()  # the first digit is always there
    assert 0 <= which.min() and which.max() < len(data.sprites)


def test_copy_last_frame_baseline():
    x = torch.rand(2, 3, 1, 4, 4)
    y = x[:, -1:].repeat(1, 5, 1, 1, 1)
    assert copy_last_frame_mse(x, y).item() == 0
    assert copy_last_frame_mse(x, y + 0.5).item() == pytest.approx(0.25)


def test_bad_arguments():
    with pytest.raises(ValueError):
        MovingDigits(frame_size=8, sprite_size=8)
    with pytest.raises(ValueError):
        MovingDigits(frames=0)
