"""The nowcasting demo CLI: outputs, resume == straight run, argument errors, and learning."""

import os
import sys

import pytest
import torch

from triton_convlstm.apps.demo.command import PRESETS, main
from triton_convlstm.apps.demo.moving_digits import MovingDigits

# Tiny sizes: 16x16 frames, 2x2 patches -> 8x8 ConvLSTM grids; a step takes milliseconds.
TINY = ["--device", "cpu", "--frame-size", "16", "--hidden", "4", "--layers", "1",
        "--batch-size", "4", "--val-size", "4", "--quiet"]


def _ckpt(path):
    return torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)


def _error_line(capsys) -> str:
    """The run's only stderr line, checked to be a one-line ``demo: error:``, no traceback."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("demo: error:"), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


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
    # The trial write that checks --out before training leaves nothing behind.
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "loss.png", "predictions.png"]


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
    from triton_convlstm.apps.demo.moving_digits import MovingDigits, copy_last_frame_mse

    val = _ckpt(out)["history"]["val"][-1][1]
    seq = MovingDigits(20, 16, split="val", seed=10_000).fixed_set(64)
    copy_last = copy_last_frame_mse(seq[:, :10], seq[:, 10:]).item()
    black = seq[:, 10:].pow(2).mean().item()
    assert val < 0.6 * copy_last, (val, copy_last)
    assert val < 0.75 * black, (val, black)


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    assert main([*TINY, "--steps", "1", "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def _with(good, **changes):
    ckpt = torch.load(good, map_location="cpu", weights_only=False)
    ckpt.update(changes)
    return ckpt


def _args_without(good, key):
    ckpt = _with(good)
    del ckpt["args"][key]
    return ckpt


NOT_CHECKPOINTS = {  # name -> writes the file at `path`, given the good checkpoint `good`
    "text file": lambda path, good: path.write_text("learning rate 0.003\n"),
    "empty file": lambda path, good: path.write_bytes(b""),
    "truncated": lambda path, good: path.write_bytes(good.read_bytes()[:2000]),
    "other dict": lambda path, good: torch.save({"weights": torch.zeros(3)}, path),
    "bare state_dict": lambda path, good: torch.save(_with(good)["model"], path),
    "list": lambda path, good: torch.save([1, 2, 3], path),
    "args without seed": lambda path, good: torch.save(_args_without(good, "seed"), path),
    "other model weights": lambda path, good: torch.save(
        _with(good, model={"weight": torch.zeros(2)}), path),
    "bad optimizer state": lambda path, good: torch.save(_with(good, optimizer={}), path),
}


@pytest.mark.parametrize("kind", NOT_CHECKPOINTS)
def test_resume_rejects_what_is_not_a_checkpoint(kind, good_checkpoint, tmp_path, capsys):
    path = tmp_path / "suspect.pt"
    NOT_CHECKPOINTS[kind](path, good_checkpoint)
    capsys.readouterr()
    assert main(["--device", "cpu", "--quiet", "--steps", "1", "--out", str(tmp_path / "out"),
                 "--resume", str(path)]) == 2
    assert f"--resume {path}: not a demo checkpoint (" in _error_line(capsys)


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_unusable_out_fails_before_training(where, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out = afile if where == "a file" else afile / "sub"

    def no_data(*args, **kwargs):
        raise AssertionError("the demo built its data before checking --out")

    monkeypatch.setattr("triton_convlstm.apps.demo.command.MovingDigits", no_data)
    assert main([*TINY, "--steps", "1", "--out", str(out)]) == 2
    assert f"--out {out}: " in _error_line(capsys)
    assert afile.read_text() == "not a folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes to a read-only folder")
def test_read_only_out_fails_before_training(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        assert main([*TINY, "--steps", "1", "--out", str(out)]) == 2
        assert f"--out {out}: cannot create or write" in _error_line(capsys)
    finally:
        out.chmod(0o700)


def test_seed_must_be_below_2_to_the_32(tmp_path, capsys):
    # 1e20 overflowed torch.manual_seed; 1e15 overflowed moving_digits' 64-bit seed mix.
    for seed in ("99999999999999999999", "1000000000000000", str(2**32), "-1"):
        out = tmp_path / seed
        assert main([*TINY, "--steps", "1", "--seed", seed, "--out", str(out)]) == 2, seed
        assert f"--seed must be in 0..4294967295 (below 2**32), got {seed}" in _error_line(capsys)
        assert not out.exists()
    assert main([*TINY, "--steps", "1", "--seed", str(2**32 - 1),
                 "--out", str(tmp_path / "top")]) == 0


def test_lr_must_be_finite(tmp_path, capsys):
    # inf and nan trained a NaN model; 1e38 overflowed Adam's float32 step size (10 * lr).
    for lr in ("inf", "nan", "1e38"):
        assert main([*TINY, "--steps", "1", "--lr", lr, "--out", str(tmp_path / "out")]) == 2
        assert "--lr must be > 0 and <= 3.4e+37, got" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_divergence_stops_the_run(tmp_path, capsys, monkeypatch):
    """A non-finite training loss ends the run with one line and exit 2; the last checkpoint is
    the last good one. (Poisoned data stands in for a diverging lr: this tiny model's outputs
    saturate rather than overflow even at lr 1e37.)"""
    real_batch = MovingDigits.batch

    def poisoned(self, step, batch_size, device="cpu"):
        batch = real_batch(self, step, batch_size, device)
        return batch.fill_(float("nan")) if self.split == "train" and step >= 1 else batch

    out = tmp_path / "out"
    monkeypatch.setattr(MovingDigits, "batch", poisoned)
    assert main([*TINY, "--steps", "3", "--eval-every", "1", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert line == "demo: error: training diverged at step 2 (loss nan); lower --lr"
    ckpt = _ckpt(out)  # written after step 1, before the poisoned batch
    assert ckpt["step"] == 1
    assert all(v.isfinite().all() for v in ckpt["model"].values())

    # A NaN model (say, a checkpoint from before this check) is caught at validation.
    monkeypatch.undo()
    ckpt["model"] = {k: torch.full_like(v, float("nan")) for k, v in ckpt["model"].items()}
    ckpt["history"]["val"] = []  # so that --steps 0 validates
    torch.save(ckpt, out / "checkpoint.pt")
    assert main(["--device", "cpu", "--quiet", "--steps", "0", "--out", str(out),
                 "--resume"]) == 2
    assert "training diverged at step 1 (validation MSE nan)" in _error_line(capsys)


DEPENDENCIES = [(("tqdm",), "tqdm"), (("matplotlib", "matplotlib.figure"), "matplotlib"),
                (("sklearn", "sklearn.datasets"), "scikit-learn")]


@pytest.mark.parametrize("modules,package", DEPENDENCIES, ids=[p for _, p in DEPENDENCIES])
def test_missing_demo_dependency_is_one_line(modules, package, tmp_path, capsys, monkeypatch):
    for name in modules:  # None in sys.modules: `import name` raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "out"
    assert main([*TINY, "--steps", "1", "--out", str(out)]) == 2
    assert _error_line(capsys) == (f'demo: error: needs {package} (the demo extra): '
                                   'pip install -e ".[demo]"')
    assert not out.exists()  # reported up front, not after training


def test_resume_keeps_eval_every(tmp_path):
    out = tmp_path / "run"
    resume = ["--device", "cpu", "--quiet", "--out", str(out), "--resume"]

    def val_steps():
        return [s for s, _ in _ckpt(out)["history"]["val"]]

    assert main([*TINY, "--steps", "3", "--eval-every", "3", "--out", str(out)]) == 0
    assert main([*resume, "--steps", "6"]) == 0  # the new run's default would be every step
    assert val_steps() == [3, 6, 9]
    # It does not change what is trained, so a resumed run may set another one...
    assert main([*resume, "--steps", "2", "--eval-every", "2"]) == 0
    assert val_steps()[3:] == [10, 11]  # every 2nd global step, and the last
    # ...and a checkpoint without the key resumes with the default (4 per run).
    ckpt = _ckpt(out)
    del ckpt["args"]["eval_every"]
    torch.save(ckpt, out / "checkpoint.pt")
    assert main([*resume, "--steps", "4"]) == 0
    assert val_steps()[5:] == [12, 13, 14, 15]


def test_help_names_the_presets(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    assert "``" not in text and "per device" not in text
    for key in ("steps", "batch_size", "hidden", "layers", "frame_size", "patch", "lr",
                "val_size"):
        cpu, cuda = PRESETS["cpu"][key], PRESETS["cuda"][key]
        assert f"(default: {cpu:g} on CPU, {cuda:g} on CUDA)" in text, key
