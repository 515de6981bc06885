"""The nowcasting demo CLI: outputs, resume == straight run, argument errors, and learning."""

import pytest
import torch

from triton_convlstm.demo import main

# Tiny sizes: 16x16 frames, 2x2 patches -> 8x8 ConvLSTM grids; a step takes milliseconds.
TINY = ["--device", "cpu", "--frame-size", "16", "--hidden", "4", "--layers", "1",
        "--batch-size", "4", "--val-size", "4", "--quiet"]


def _ckpt(path):
    return torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)


def test_short_run_writes_outputs(tmp_path, capsys):
    assert main([*TINY, "--steps", "3", "--out", str(tmp_path)]) == 0
    for name in ("predictions.png", "loss.png", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_size > 0, name
    report = capsys.readouterr().out
    assert "copy-last" in report and "validation" in report and "sequences/s" in report
    assert "torch on cpu" in report
    ckpt = _ckpt(tmp_path)
    assert ckpt["step"] == 3 and len(ckpt["history"]["train"]) == 3
    assert {"model", "optimizer", "args", "rng"} <= set(ckpt)


def test_resume_equals_straight_run(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*TINY, "--steps", "6", "--out", str(straight)]) == 0
    assert main([*TINY, "--steps", "2", "--out", str(split)]) == 0
    # Resume twice, once by folder (the default OUT/checkpoint.pt) and once by explicit file.
    assert main(["--device", "cpu", "--quiet", "--steps", "3", "--out", str(split),
                 "--resume"]) == 0
    assert main(["--device", "cpu", "--quiet", "--steps", "1", "--out", str(split),
                 "--resume", str(split / "checkpoint.pt")]) == 0
    a, b = _ckpt(straight), _ckpt(split)
    assert a["step"] == b["step"] == 6
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for idx in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sb[idx][name], sa[idx][name], rtol=1e-5, atol=1e-8)
    assert a["history"]["train"] == pytest.approx(b["history"]["train"], rel=1e-5)


def test_resume_rejects_a_changed_model(tmp_path, capsys):
    assert main([*TINY, "--steps", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["--device", "cpu", "--hidden", "8", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--hidden 8 differs from the checkpoint's 4" in err


BAD = [
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--steps", "ten"], "invalid int value"),
    (["--device", "tpu"], "--device"),
    (["--device", "not a device"], "--device"),
    (["--frame-size", "17"], "divisible"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--resume", "/nonexistent/checkpoint.pt"], "no checkpoint"),
    (["--ddp"], "torchrun"),
]
if not torch.cuda.is_available():
    BAD.append((["--device", "cuda"], "CUDA is not available"))


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_give_one_line(argv, message, tmp_path, capsys, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo: error:"), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--resume" in capsys.readouterr().out


def test_model_beats_copy_last_frame(tmp_path, capsys):
    """A short real training run (fixed seed): the validation MSE must be well under both the
    copy-last-frame baseline and all-black frames (which already beats copy-last)."""
    out = tmp_path / "learn"
    assert main(["--device", "cpu", "--quiet", "--frame-size", "16", "--hidden", "12",
                 "--batch-size", "8", "--steps", "150", "--lr", "4e-3", "--val-size", "64",
                 "--seed", "0", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "clearly beats the copy-last-frame baseline" in report
    from triton_convlstm.moving_digits import MovingDigits, copy_last_frame_mse

    val = _ckpt(out)["history"]["val"][-1][1]
    seq = MovingDigits(20, 16, split="val", seed=10_000).fixed_set(64)
    copy_last = copy_last_frame_mse(seq[:, :10], seq[:, 10:]).item()
    black = seq[:, 10:].pow(2).mean().item()
    assert val < 0.6 * copy_last, (val, copy_last)
    assert val < 0.75 * black, (val, black)
