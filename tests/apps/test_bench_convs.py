"""bench/bench_convs.py: split and cat compute the same gates, and --dry-run writes its rows.
No timing is asserted."""

import importlib.util
import json
from pathlib import Path

import torch

from triton_convlstm.apps.bench.cases import SHAPES

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_convs", ROOT / "bench" / "bench_convs.py")
bench_convs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_convs)


def test_split_and_cat_compute_the_same_gates():
    case = bench_convs.make_case(SHAPES["cpu-s"], torch.float32, torch.device("cpu"), seed=3)
    split = bench_convs.split_forward(case)
    cat = bench_convs.cat_forward(case)
    stored = bench_convs.cat_forward(case, store=True)
    assert len(split) == len(cat) == SHAPES["cpu-s"].steps
    for s, c, st in zip(split, cat, stored):
        torch.testing.assert_close(c, s, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(st, c)
    # store=True left the cat frames in the training buffer, step by step.
    b, c_in = case["b"], case["x"].shape[1]
    torch.testing.assert_close(case["xh"][:, :c_in], case["x"])
    torch.testing.assert_close(case["xh"][b:2 * b, c_in:], case["h"][b:2 * b])


def test_dry_run_writes_rows(tmp_path, capsys):
    out = tmp_path / "convs.json"
    n_threads = torch.get_num_threads()
    try:
        assert bench_convs.main(["--dry-run", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n_threads)  # the dry run pins one thread; leave others as found
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["torch"] == torch.__version__
    rows = data["rows"]
    assert [(r["shape"], r["dtype"], r["mode"]) for r in rows] == [
        ("cpu-s", "fp32", "fwd"), ("cpu-s", "fp32", "train")]
    for r in rows:
        assert r["split_ms"] > 0 and r["cat_ms"] > 0 and r["speedup"] > 0
        assert r["verdict"] in ("cat", "split", "same")
    assert "verdict" in capsys.readouterr().out


def test_verdict_margin():
    assert [bench_convs.verdict(s) for s in (1.10, 1.0, 1.04, 0.96, 0.90)] == [
        "cat", "same", "same", "same", "split"]
