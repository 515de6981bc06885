"""bench/bench_fused_step.py: the split and fused sequences it times compute the same outputs,
every tile config it sweeps included, and --dry-run writes its rows. No timing is asserted."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from triton_convlstm.backend import interpreter_enabled

ROOT = Path(__file__).resolve().parents[2]
# The dry-run cases run the Triton kernels on CPU tensors: only under the interpreter (set by
# conftest where there is no CUDA; a full run on a GPU box has it off).
needs_interpreter = pytest.mark.skipif(not interpreter_enabled(),
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
_spec = importlib.util.spec_from_file_location("bench_fused_step",
                                               ROOT / "bench" / "bench_fused_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@needs_interpreter
def test_split_and_fused_compute_the_same_sequence():
    case = bench.make_case(bench.DRY, torch.float32, torch.device("cpu"), seed=2)
    want = bench.split_forward(case)
    for cfg in (None, {"BLOCK_M": 16, "BLOCK_C": 16, "num_warps": 4, "num_stages": 2}):
        torch.testing.assert_close(bench.fused_forward(case, cfg), want, rtol=1e-5, atol=1e-5)


def test_sweep_keeps_channel_tiles_that_fit_the_hidden_size():
    assert bench.configs(64, sweep=False) == [None]
    small = bench.configs(32, sweep=True)
    assert small[0] is None and {c["BLOCK_C"] for c in small[1:]} == {32}
    assert {c["BLOCK_C"] for c in bench.configs(64, sweep=True)[1:]} == {32, 64}


@needs_interpreter
def test_dry_run_writes_rows(tmp_path, capsys):
    out = tmp_path / "fused.json"
    assert bench.main(["--dry-run", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["dtype"]) for r in rows] == [("dry", "fp32")]
    r = rows[0]
    assert not r["errors"] and set(r["configs_ms"]) == {"default", "m16-c16-w4-s2"}
    assert r["split_ms"] > 0 and r["best_ms"] > 0 and r["speedup"] > 0
    assert "split/best" in capsys.readouterr().out


@needs_interpreter
def test_rows_grow_one_config_at_a_time():
    """A GPU phase cut off mid-sweep keeps what it finished: the row is written after each
    config, and a config that cannot run is reported without stopping the others."""
    import copy

    snapshots = []
    grid = {"BLOCK_M": (16, 24), "BLOCK_C": (16,), "num_warps": (4,), "num_stages": (2,)}
    bench.run([bench.DRY], ["fp32"], "cpu", sweep=True, rounds=1, reps=1, grid=grid,
              on_row=lambda rows: snapshots.append(copy.deepcopy(rows)))
    first = snapshots[0][0]
    assert set(first["configs_ms"]) == {"default"} and first["split_ms"] > 0
    assert first["best"] == "default" and first["speedup"] > 0
    assert set(first["configs_speedup"]) == {"default"}
    last = snapshots[-1][0]
    assert set(last["configs_ms"]) == {"default", "m16-c16-w4-s2"}
    assert set(last["errors"]) == {"m24-c16-w4-s2"}  # tl.arange: powers of two only
