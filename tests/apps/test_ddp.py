"""--ddp: two gloo processes on loopback train exactly what one process trains on the same global
batches, and only rank 0 writes files.

The ranks run in spawned processes with the environment torchrun would give them (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT=a free port) and call the CLI's
``main``; each gets its own --out so that anything rank 1 writes would show.
"""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from triton_convlstm.apps.demo.command import main

ARGS = ["--device", "cpu", "--frame-size", "16", "--hidden", "4", "--layers", "1",
        "--batch-size", "4", "--val-size", "4", "--steps", "3", "--lr", "1e-2", "--quiet"]
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, root: str) -> None:
    # Exactly what torchrun exports for each worker.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, whatever the hostname
    torch.set_num_threads(1)
    code = main([*ARGS, "--ddp", "--out", os.path.join(root, f"rank{rank}")])
    if code != 0:
        raise SystemExit(code)


def _ckpt(path):
    return torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)


def test_ddp_matches_single_process_and_only_rank0_writes(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    assert main([*ARGS, "--out", str(tmp_path / "single")]) == 0

    assert not (tmp_path / "rank1").exists(), "rank 1 wrote files"
    written = sorted(p.name for p in (tmp_path / "rank0").iterdir())
    assert written == ["checkpoint.pt", "loss.png", "predictions.png"]

    ddp, single = _ckpt(tmp_path / "rank0"), _ckpt(tmp_path / "single")
    assert ddp["step"] == single["step"] == 3
    for key, value in single["model"].items():
        # Same global batches; only the order of the gradient sums differs (two half batches
        # averaged by all-reduce vs one full batch).
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # The logged loss is the global-batch loss, not rank 0's shard.
    assert ddp["history"]["train"] == pytest.approx(single["history"]["train"], rel=1e-4)


def test_batch_must_split_evenly(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert main([*ARGS, "--ddp", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert "not divisible by 3 ranks" in capsys.readouterr().err
