"""The bench command line: `bench compare` on synthetic pytest-benchmark files, argument errors,
a tiny CPU run end to end, and bench/gpu_check.py's --dry-run. No timing is asserted."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_convlstm.apps.bench.command import main

ROOT = Path(__file__).resolve().parents[2]


def _bench_json(path: Path, medians: dict[str, float]) -> str:
    """A pytest-benchmark JSON file with the fields `compare` reads (medians in seconds)."""
    path.write_text(json.dumps({
        "machine_info": {}, "commit_info": {}, "version": "5.1.0",
        "benchmarks": [{"name": n.split("::")[-1], "fullname": n, "stats": {"median": m}}
                       for n, m in medians.items()],
    }))
    return str(path)


@pytest.fixture
def old(tmp_path):
    return _bench_json(tmp_path / "old.json",
                       {"bench/test_perf.py::test_a": 0.010, "bench/test_perf.py::test_b": 0.200})


def test_compare_passes_within_threshold(tmp_path, old, capsys):
    new = _bench_json(tmp_path / "new.json",
                      {"bench/test_perf.py::test_a": 0.0105, "bench/test_perf.py::test_b": 0.150})
    assert main(["compare", old, new]) == 0
    out = capsys.readouterr().out
    assert "test_a" in out and "test_b" in out
    assert "10.000" in out and "10.500" in out and "1.050" in out  # old ms, new ms, new/old
    assert "SLOWER" not in out


def test_compare_fails_on_a_slowdown_and_names_it(tmp_path, old, capsys):
    new = _bench_json(tmp_path / "new.json",
                      {"bench/test_perf.py::test_a": 0.012, "bench/test_perf.py::test_b": 0.200})
    assert main(["compare", old, new]) == 1
    out = capsys.readouterr().out
    slower = [ln for ln in out.splitlines() if "SLOWER" in ln]
    assert len(slower) == 1 and "test_a" in slower[0] and "1.200" in slower[0]


def test_compare_threshold_option(tmp_path, old):
    new = _bench_json(tmp_path / "new.json",
                      {"bench/test_perf.py::test_a": 0.012, "bench/test_perf.py::test_b": 0.200})
    assert main(["compare", old, new, "--threshold", "0.25"]) == 0
    assert main(["compare", old, new, "--threshold", "0.1"]) == 1


def test_compare_lists_cases_in_one_file_only_without_failing(tmp_path, old, capsys):
    new = _bench_json(tmp_path / "new.json",
                      {"bench/test_perf.py::test_a": 0.010, "bench/test_perf.py::test_c": 9.0})
    assert main(["compare", old, new]) == 0
    out = capsys.readouterr().out
    assert "only in old: bench/test_perf.py::test_b" in out
    assert "only in new: bench/test_perf.py::test_c" in out


@pytest.mark.parametrize("content", [None, "{not json", '{"something": "else"}',
                                     '{"benchmarks": [{"name": "x"}]}'])
def test_compare_bad_file_is_one_clear_line(tmp_path, old, capsys, content):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["compare", old, str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "\n" not in err


@pytest.mark.parametrize("argv", [
    ["compare", "only-one.json"],
    ["compare", "a.json", "b.json", "--threshold", "-1"],
    ["--shapes", "XL"],
    ["--modes", "sideways"],
    ["--device", "cpu", "--impls", "compiled-ro"],
    ["--sweep", "0,4"],
    ["--no-such-option"],
    ["--budget-s", "0"], ["--budget-s", "-5"], ["--budget-s", "nan"],
    ["--target-s", "-1"], ["--target-s", "inf"],
    ["table", "--no-such-option"],
])
def test_bad_arguments_are_one_line_and_nonzero(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_an_unwritable_out_folder_is_refused_before_any_case_runs(tmp_path, capsys, monkeypatch):
    import triton_convlstm.apps.bench.command as benchmark

    monkeypatch.setattr(benchmark, "run_benchmark", lambda *a: pytest.fail("a case ran"))
    afile = tmp_path / "afile"
    afile.write_text("")
    for out in (afile, afile / "below"):  # a file where the folder should be; under a file
        assert main(["--device", "cpu", "--quiet", "--no-plots", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: --out {out}: cannot write there") and "\n" not in err


@pytest.mark.parametrize(("module", "flag"), [("tqdm", "--quiet"), ("matplotlib", "--no-plots")])
def test_a_missing_extra_is_named_before_any_case_runs(module, flag, tmp_path, capsys,
                                                       monkeypatch):
    import triton_convlstm.apps.bench.command as benchmark

    monkeypatch.setattr(benchmark, "run_benchmark", lambda *a: pytest.fail("a case ran"))
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    argv = ["--device", "cpu", "--quiet", "--no-plots", "--out", str(tmp_path)]
    argv.remove(flag)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"needs {module} (in the bench extra)" in err and "\n" not in err


def _results_json(path: Path, rows: dict[str, float | None]) -> str:
    """A bench results.json: impl/shape/dtype/mode -> median ms (None: the case failed)."""
    path.write_text(json.dumps({"rows": [
        dict(zip(("impl", "shape", "dtype", "mode"), name.split("/")), median_ms=ms,
             error=None if ms else "OutOfMemoryError: ...") for name, ms in rows.items()]}))
    return str(path)


def test_compare_fails_on_a_case_that_failed_in_the_new_run(tmp_path, capsys):
    layer, eager = "layer/S/bf16/train", "eager/S/bf16/train"
    old = _results_json(tmp_path / "old.json", {layer: 1.0, eager: 9.0})
    new = _results_json(tmp_path / "new.json", {layer: None, eager: 9.0})
    assert main(["compare", old, new]) == 1
    out = capsys.readouterr().out
    assert "ERROR (failed in the new run)" in out
    assert "1 of 2 cases failed in the new run: layer/S/bf16/train" in out
    assert main(["compare", new, old]) == 0  # fixed since: nothing to hold against it
    assert "(failed in the old run)" in capsys.readouterr().out


def test_compare_of_files_sharing_no_case_is_an_error(tmp_path, old, capsys):
    other = _results_json(tmp_path / "results.json", {"layer/S/bf16/train": 1.0})
    assert main(["compare", old, other]) == 2  # one file of each format
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "share no case" in err and "\n" not in err


def test_tiny_cpu_run_writes_table_json_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--shapes", "cpu-s", "--modes", "fwd,train",
            "--impls", "eager,layer,convs-only", "--repeats", "1", "--sweep", "2,3",
            "--threads", "1", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "median ms" in table and "x eager" in table and "peak MiB" in table
    result = json.loads((out / "results.json").read_text())
    assert {"torch", "triton", "python", "date", "gpu"} <= set(result["meta"])
    cases = {(r["impl"], r["mode"]) for r in result["rows"]}
    assert cases == {(i, m) for i in ("eager", "layer", "convs-only") for m in ("fwd", "train")}
    assert all(r["error"] is None and r["median_ms"] > 0 for r in result["rows"])
    # The allocator's footprint is a CUDA reading; on CPU the key is there, empty.
    assert all("peak_reserved_mb" in r and r["peak_reserved_mb"] is None for r in result["rows"])
    assert all(r["speedup_vs_eager"] > 0 for r in result["rows"])
    assert sorted({r["steps"] for r in result["sweep"]}) == [2, 3]
    assert result["meta"]["cudnn_benchmark"] is False  # the default leaves cuDNN's heuristics
    for png in ("time_vs_T.png", "speedup.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The same file feeds `compare` (cases named impl/shape/dtype/mode).
    assert main(["compare", str(out / "results.json"), str(out / "results.json")]) == 0
    assert "layer/cpu-s/fp32/train" in capsys.readouterr().out


def test_cudnn_benchmark_flag_is_set_and_recorded(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--shapes", "cpu-s", "--modes", "fwd", "--impls", "layer",
            "--repeats", "1", "--sweep", "2", "--threads", "1", "--quiet", "--no-plots",
            "--cudnn-benchmark", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["meta"]["cudnn_benchmark"] is True


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        # One small unit-test module and the perf suite: collecting all of tests/ again costs
        # time, not cover.
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--budget-s", "150", "--out", str(out),
         "--test-paths", "tests/lib/test_gates_in_place.py", "bench/test_perf.py",
         "--profile", "cpu-s:fp32:fwd:layer", "--convs",
         "--fused", "--extras-share", "0.45"],
        cwd=ROOT, capture_output=True, text=True, timeout=220,
        env=dict(os.environ, OUT=str(tmp_path / "out")),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["tests"]["status"] == "passed"
    counts = report["tests"]["counts"]
    assert counts.get("skipped", 0) > 0 and "failed" not in counts  # the gpu cases, skipped
    # The unit tests, then the perf gates alone (nothing else on the GPU while they time).
    assert [p["name"] for p in report["tests"]["parts"]] == ["tests", "perf-gates"]
    assert report["tests"]["parts"][1]["workers"] == 1
    assert {r["impl"] for r in report["bench"]["rows"]} == {"eager", "layer", "convs-only",
                                                           "layer-lengths"}
    # The family phase's rows (1-d, 3-d, bidirectional) join the 2-d run's.
    from triton_convlstm.apps.bench.cases import FAMILY_CPU_SHAPES

    assert {r["shape"] for r in report["bench"]["rows"]} == {"cpu-s", *FAMILY_CPU_SHAPES}
    assert report["bench"]["family"]["exit_code"] == 0
    (profiled,) = report["profile"]["results"]  # the optional phases, asked for
    assert profiled["case"] == "cpu-s:fp32:fwd:layer" and profiled["rows"]
    assert {r["verdict"] for r in report["convs"]["results"]["rows"]} <= {"cat", "split", "same"}
    (fused,) = report["fused"]["results"]["rows"]
    assert fused["shape"] == "dry" and fused["speedup"] > 0 and not fused["errors"]
    copied = {p.name for p in (tmp_path / "out").iterdir()}
    assert "check.json" in copied and "cpu-dry-run-speedup.png" in copied


def test_gpu_check_merges_test_parts():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_check import merge_tests
    finally:
        sys.path.remove(str(ROOT / "bench"))
    units = {"name": "tests", "status": "passed", "counts": {"passed": 5, "skipped": 1},
             "failures": [], "seconds": 3.0}
    gates = {"name": "perf-gates", "status": "failed", "counts": {"passed": 1, "failed": 1},
             "failures": ["FAILED bench/test_perf.py::x"], "seconds": 2.5,
             "benchmarks": [{"name": "x"}]}
    cut = {"name": "perf-gates", "status": "timeout", "counts": {}, "failures": [],
           "seconds": 0.0}
    merged = merge_tests([units, gates])
    assert merged["status"] == "failed" and merged["seconds"] == 5.5
    assert merged["counts"] == {"passed": 6, "skipped": 1, "failed": 1}
    assert merged["failures"] == gates["failures"] and merged["benchmarks"] == [{"name": "x"}]
    assert merge_tests([units, cut])["status"] == "timeout"
    assert merge_tests([units])["status"] == "passed"


def test_gpu_check_out_inside_OUT(tmp_path):
    """The documented call writes --out into $OUT itself: no copy onto itself at the end."""
    dest = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--budget-s", "60", "--skip-tests",
         "--out", str(dest / "h200.json"), "--bench-args", "--shapes cpu-s --impls layer"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, OUT=str(dest)),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((dest / "h200.json").read_text())["dry_run"]


def _results(path: Path, date: str, rows: list[tuple]) -> Path:
    path.write_text(json.dumps({
        "meta": {"gpu": "Test GPU", "torch": "9.9", "triton": "9.9", "date": date},
        "bench": {"rows": [{"impl": i, "shape": s, "dtype": "bf16", "mode": m, "median_ms": ms,
                            "peak_mem_mb": mem} for i, s, m, ms, mem in rows]},
    }))
    return path


def test_table_merges_runs_later_rows_win(tmp_path, capsys):
    first = _results(tmp_path / "a.json", "2026-01-01", [
        ("eager", "S", "train", 10.0, 100.0), ("compiled-ro", "S", "train", 2.0, 10.0),
        ("compiled", "S", "train", 3.0, 10.0), ("layer", "S", "train", 4.0, 50.0)])
    second = _results(tmp_path / "b.json", "2026-01-02", [
        ("eager", "S", "train", 10.0, 100.0), ("layer", "S", "train", 1.0, 40.0)])
    assert main(["table", str(first), str(second)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| S | bf16 | train"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "2.000 [1]"          # best compile, from the first run
    assert cells[5] == "1.000 [2]"          # the layer, replaced by the second run
    assert cells[7:10] == ["10.00x", "2.00x", "0.40"]
    assert "[2] `" in out and "Test GPU" in out


def test_table_without_files_is_usage_error(capsys):
    assert main(["table"]) == 2


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", '{"gates": []}'])
def test_table_of_a_bad_file_is_one_clear_line(tmp_path, capsys, content):
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    assert main(["table", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: ") and "\n" not in err


def test_table_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["table", "--help"])
    assert exit_.value.code == 0
    assert "usage: python -m triton_convlstm bench table" in capsys.readouterr().out


def _documented_gpu_calls() -> list[list[str]]:
    """gpu_check's arguments in the calls docs/PERF_NOTES.md prescribes for a GPU session (its
    fenced commands)."""
    import re

    text = (ROOT / "docs" / "PERF_NOTES.md").read_text()
    fenced = re.findall(r"```bash\n(python3 bench/gpu_check.py.*?)\n```", text, re.S)
    return [shlex.split(cmd.replace("\\\n", " "))[2:] for cmd in fenced]


def test_documented_gpu_calls_parse():
    """A typo in the prescribed command would cost a lent GPU's one call: its options, and the
    options it hands the bench command, must be ones the scripts take."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from gpu_check import bench_args, parser
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from triton_convlstm.apps.bench.command import _parser as bench_parser

    calls = _documented_gpu_calls()
    assert len(calls) == 2 and "--skip-tests" in calls[1]
    for argv in calls:
        args = parser().parse_args([a.replace("$OUT", "/tmp/out") for a in argv])
        bench = bench_parser().parse_args(bench_args(False) + shlex.split(args.bench_args))
        assert bench.shapes and bench.impls
    # Two calls, their transfers and the machine's start fit the session's 15 minutes.
    budgets = [parser().parse_args(argv).budget_s for argv in calls]
    assert sum(budgets) + 2 * 40 + 120 <= 15 * 60, budgets
    assert parser().parse_args(calls[0]).test_paths == ["tests"]


def test_the_lengths_case_calls_the_layer_with_mixed_lengths(monkeypatch):
    from triton_convlstm.apps.bench import cases

    seen = []
    real = cases.mixed_lengths
    monkeypatch.setattr(cases, "mixed_lengths", lambda b, t: seen.append((b, t)) or real(b, t))
    cases.build_step("layer-lengths", cases.SHAPES["cpu-s"], "fp32", "fwd", torch.device("cpu"))()
    assert seen == [(2, 8)] and real(2, 8).tolist() == [8, 4]


def test_layer_impl_names_set_the_layer_switches():
    from triton_convlstm.apps.bench.cases import LAYER_IMPLS, SHAPES, _configure, make_models

    want = {  # cuda_graphs, recompute_gates, fused_forward
        "layer": (True, False, False), "layer-nographs": (False, False, False),
        "layer-recompute": (True, True, False), "layer-fused": (True, False, True),
        "layer-fused-nographs": (False, False, True),
        "layer-compiled-ro": (False, False, False),  # cudagraph trees capture it instead
        "layer-lengths": (True, False, False),  # the plain layer, called with lengths
        "layer-compiled": (False, False, False),  # torch.compile's default mode
    }
    assert set(want) == set(LAYER_IMPLS)
    _, layer = make_models(SHAPES["cpu-s"], torch.device("cpu"), torch.float32)
    for impl, switches in want.items():
        _configure(layer, impl)
        assert (layer.cuda_graphs, layer.recompute_gates, layer.fused_forward) == switches, impl


def test_layer_under_reduce_overhead_needs_cuda():
    from triton_convlstm.apps.bench.cases import SHAPES, build_step

    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_step("layer-compiled-ro", SHAPES["cpu-s"], "fp32", "train", torch.device("cpu"))
