"""One command for a GPU machine: the gpu tests, the benchmark, a table and one JSON file.

    python bench/gpu_check.py                    # about 330 s in all, never more
    python bench/gpu_check.py --budget-s 200 --out /tmp/h200.json
    python bench/gpu_check.py --dry-run          # on CPU, tiny shapes: the same plumbing
    python bench/gpu_check.py --skip-bench --marker '' --test-paths tests/lib/test_export.py

(the last: a targeted rerun of some test files. Ad-hoc commands on a GPU box install with
``python -m pip install --no-index --no-deps --no-build-isolation -e .``: a bare ``pip`` there
belongs to another Python, and the kernels then do not import, as ensure_importable knows.)

(a) ``pytest -m gpu tests -n 8`` (xdist where installed), then ``pytest -m gpu
bench/test_perf.py`` alone (the perf gates), within a time cap; on request (--profile,
--convs, --fused) a kernel breakdown of a case, split-vs-cat convolution timings and the fused
forward step's tile sweep; (b) ``python -m
triton_convlstm bench``: first the rest of the family (1-d, 3-d, bidirectional M; eager, layer,
convs-only; bf16; fwd, train) within its own share of the budget, then the 2-d benchmark (eager,
compiled, compiled-ro, layer, convs-only; S, M, L; bf16, fp32; fwd, train; peak memory; compile
times at T=8 and 64) with what is left, each skipping what would not fit and saying so, (c) a
table and ``bench/results/<gpu-name>.json`` (or --out), copied with the plots into $OUT when that
is set. Each phase runs in a child process killed at its cap, and the
benchmark streams its rows to disk, so a cut-off run still reports what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

START = time.monotonic()  # the budget counts from here, torch's import included
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU box runs from a plain checkout, nothing installed

import torch  # noqa: E402

from triton_convlstm.apps.bench.cases import FAMILY_CPU_SHAPES, FAMILY_GPU_SHAPES  # noqa: E402
from triton_convlstm.apps.bench.command import environment  # noqa: E402
from triton_convlstm.apps.bench.report import add_ratios, format_table  # noqa: E402

GOALS = {("train", "S"): 2.0, ("train", "M"): 2.0, ("train", "L"): 1.7,
         ("fwd", "S"): 1.3, ("fwd", "M"): 1.3, ("fwd", "L"): 1.05}
MARGIN_S = 10.0  # kept back for writing results after the last child is stopped
TEST_TIMEOUT_S = 120  # per test, where pytest-timeout is installed
GATES_MIN_S = 60.0  # kept for the perf gates when the unit tests run before them


def child_env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def ensure_importable() -> str:
    """The kernels live in ROOT/kernels and import as triton_convlstm.kernels only through the
    package install (pyproject's package-dir). A bare GPU box has none: install the checkout
    editable, offline and without dependencies, which changes nothing else there."""
    probe = [sys.executable, "-c", "import triton_convlstm.kernels.gates"]
    if subprocess.run(probe, cwd=ROOT, env=child_env(), capture_output=True).returncode == 0:
        return "importable"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                          "--no-build-isolation", "-e", str(ROOT)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    if subprocess.run(probe, cwd=ROOT, env=child_env(), capture_output=True).returncode == 0:
        return "installed editable (pip -e, offline)"
    return f"triton_convlstm.kernels not importable: {pip.stderr.strip()[-300:]}"


def run_capped(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group, echo and log its output, kill the whole group at
    ``timeout`` seconds. Returns (exit status, or None when killed; the output)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []

    def pump():  # a thread, so that the wait below can time out while output flows
        with log.open("w") as f:
            for line in proc.stdout:
                lines.append(line)
                f.write(line)
                print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # pytest's and inductor's compile workers too
        proc.wait()
        rc = None
    reader.join(timeout=5)
    return rc, "".join(lines)


def parse_pytest(output: str, rc: int | None) -> dict:
    """Counts from pytest's summary line, or from its progress dots when it was cut off."""
    counts: dict[str, int] = {}
    summary = [ln for ln in output.splitlines()
               if re.search(r"\d+ (passed|failed|skipped|error)", ln)
               and re.search(r" in [\d.]+s", ln)]
    if summary:
        for n, what in re.findall(r"(\d+) (\w+)", summary[-1]):
            counts[what.rstrip("s") if what in ("errors", "warnings") else what] = int(n)
    else:  # killed: count the -q progress characters seen so far
        progress = "".join(re.sub(r"\s*\[\s*\d+%\]\s*$", "", ln) for ln in output.splitlines()
                           if re.fullmatch(r"[.FEsxX]+\s*(\[\s*\d+%\])?\s*", ln))
        for ch, what in ((".", "passed"), ("F", "failed"), ("E", "error"), ("s", "skipped")):
            if progress.count(ch):
                counts[what] = progress.count(ch)
    failures = [ln for ln in output.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    status = "timeout" if rc is None else ("passed" if rc in (0, 5) else "failed")
    return {"status": status, "exit_code": rc, "counts": counts, "failures": failures,
            "output_tail": output[-4000:]}


def has_plugin(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def default_workers() -> int:
    """Parallel pytest workers for the unit tests: their time on a bare box is mostly Triton
    and inductor compiling on the CPU, which spreads over cores (pytest-xdist, in the GPU
    image); one where xdist is missing."""
    return min(8, max(1, (os.cpu_count() or 1) // 2)) if has_plugin("xdist") else 1


def run_tests(cap: float, work: Path, paths: list[str], marker: str = "gpu", workers: int = 1,
              name: str = "tests") -> dict:
    # Benchmark storage in the scratch folder: pytest-benchmark would litter the checkout.
    # No -x: one device call is precious, so every failure is reported, not just the first.
    # The gates run with -s: each prints its measurement as it ends, so a phase
    # killed at its cap still reports them (pytest's failure messages come only at the end;
    # the H100 run of 2026-12-06 lost four that way).
    select = ["-m", marker] if marker else []
    if name == "perf-gates":
        select.append("-s")
    spread = ["-n", str(workers)] if workers > 1 else []
    # A hung test (a deadlock on real streams, say) must not eat the whole phase.
    # The thread method: a test stuck inside a C call (a CUDA wait) ignores signals.
    guard = (["--timeout", str(TEST_TIMEOUT_S), "--timeout-method", "thread"]
             if has_plugin("pytest_timeout") else [])
    cmd = [sys.executable, "-m", "pytest", *select, *paths, "-q", "-p",
           "no:cacheprovider", *spread, *guard, f"--benchmark-json={work / f'{name}_bench.json'}",
           f"--benchmark-storage=file://{work / 'storage'}"]
    print(f"== gpu {name} (cap {cap:.0f} s): {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    rc, output = run_capped(cmd, cap, work / f"{name}.log")
    result = {"name": name, **parse_pytest(output, rc), "workers": workers}
    result["seconds"] = round(time.monotonic() - t0, 1)
    bench_json = work / f"{name}_bench.json"
    text = bench_json.read_text() if bench_json.exists() else ""
    if text.strip():  # empty when no benchmark ran; the gates' measured ratios ride in extra_info
        data = json.loads(text)
        result["benchmarks"] = [{"name": b["name"], "median_s": b["stats"]["median"],
                                 **b.get("extra_info", {})} for b in data["benchmarks"]]
    return result


def merge_tests(parts: list[dict]) -> dict:
    """One report of the unit tests and the perf gates: counts added, the worst status."""
    counts: dict[str, int] = {}
    for part in parts:
        for what, n in part["counts"].items():
            counts[what] = counts.get(what, 0) + n
    statuses = [part["status"] for part in parts]
    status = next((s for s in ("failed", "timeout") if s in statuses), "passed")
    return {"status": status, "counts": counts,
            "failures": [f for part in parts for f in part["failures"]],
            "seconds": round(sum(part["seconds"] for part in parts), 1),
            "benchmarks": [b for part in parts for b in part.get("benchmarks", [])],
            "parts": parts}


def run_all_tests(cap: float, work: Path, paths: list[str], marker: str, workers: int) -> dict:
    """The unit tests first, spread over ``workers``; then the perf gates (paths under bench/)
    alone, one process, so that nothing else runs on the GPU while they time it."""
    deadline = time.monotonic() + cap
    units = [p for p in paths if not Path(p).parts[:1] == ("bench",)]
    gates = [p for p in paths if p not in units]
    parts = []
    for name, group, n in (("tests", units, workers), ("perf-gates", gates, 1)):
        left = deadline - time.monotonic()
        if name == "tests" and gates:  # the unit tests must leave the gates some time
            left -= min(GATES_MIN_S, left / 2)
        if group and left > 5:
            parts.append(run_tests(left, work, group, marker, n, name))
        elif group:
            parts.append({"name": name, "status": "timeout", "counts": {}, "seconds": 0.0,
                          "failures": [f"{name}: not run, no time left in the tests' share"]})
    return merge_tests(parts)


def bench_args(dry_run: bool) -> list[str]:
    if dry_run:  # torch.compile on CPU takes minutes of C++ compiling: left out here
        return ["--device", "cpu", "--dtype", "fp32", "--shapes", "cpu-s", "--impls",
                "eager,layer,convs-only", "--repeats", "1", "--sweep", "2", "--threads", "1"]
    return ["--device", "cuda", "--dtype", "bf16,fp32", "--shapes", "S,M,L", "--modes",
            "train,fwd", "--impls", "eager,compiled,compiled-ro,layer,convs-only",
            "--compile-times", "on", "--sweep", "4,8,16,32"]


def family_args(dry_run: bool) -> list[str]:
    """The bench command's options for the family phase: the 1-d, 3-d and bidirectional shapes
    against the formulation written the popular way for each (eager), with the floor
    (convs-only), and the layer told mixed lengths (layer-lengths: what variable-length
    masking costs over the padded batch, issue 18's goal). No compiled baselines (each costs
    10-30 s of compiling per case, which the 2-d goals need more) and no plots (their names
    would clash with the main run's in $OUT).

    Args:
        dry_run: CPU, the tiny family shapes, one thread (the same plumbing, in seconds).

    Returns:
        The options, before ``--family-args`` (later options win in argparse).
    """
    impls = ["--impls", "eager,layer,layer-lengths,convs-only", "--no-plots"]
    if dry_run:
        return ["--device", "cpu", "--dtype", "fp32", "--shapes", ",".join(FAMILY_CPU_SHAPES),
                *impls, "--repeats", "1", "--sweep", "2", "--threads", "1"]
    # bf16 only: the family's first numbers, in ~24 cases; fp32 by --family-args. The T sweep
    # (the bench command always runs one for its first shape) at one short T, cheap.
    return ["--device", "cuda", "--dtype", "bf16", "--shapes", ",".join(FAMILY_GPU_SHAPES),
            "--modes", "train,fwd", *impls, "--compile-times", "off", "--sweep", "16"]


def run_bench(cap: float, work: Path, dry_run: bool, extra: list[str] = (),
              name: str = "bench", base: list[str] | None = None,
              margin_s: float = 15.0) -> dict:
    """One run of the bench command in a child process killed at ``cap`` seconds.

    Args:
        cap: seconds, the hard cap (the command's own --budget-s is ``margin_s`` less).
        work: the scratch folder; the run writes work/<name>/ and work/<name>.log.
        dry_run: picks the default options (:func:`bench_args`) when ``base`` is None.
        extra: options after the defaults (they win).
        name: the phase's name: its folder, log and the line printed.
        base: the options before ``extra``; None: :func:`bench_args`.
        margin_s: seconds kept back from the command's own budget for its start (torch's
            import) and the overrun of its last case.

    Returns:
        The command's results.json (rows, sweep, compile_times, skipped), or what it streamed
        before the cap, with exit_code, seconds and plots added.
    """
    out = work / name
    base = bench_args(dry_run) if base is None else base
    # The bench skips by its own estimate a little before the hard cap; the cap is the backstop.
    # Later options win in argparse, so ``extra`` narrows the defaults.
    cmd = [sys.executable, "-m", "triton_convlstm", "bench", *base, *extra,
           "--quiet",
           "--budget-s", f"{max(cap - margin_s, 1):.0f}", "--out", str(out)]
    print(f"== {'benchmark' if name == 'bench' else name} (cap {cap:.0f} s): "
          f"{' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    rc, _ = run_capped(cmd, cap, work / f"{name}.log")
    if (out / "results.json").exists():
        result = json.loads((out / "results.json").read_text())
    else:  # stopped at the cap: rebuild from the rows it streamed
        result = {"rows": [], "sweep": [], "compile_times": [],
                  "skipped": [f"the benchmark was stopped at its {cap:.0f} s cap; "
                              "cases after the last row below did not run"]}
        stream = out / "rows.jsonl"
        for line in stream.read_text().splitlines() if stream.exists() else []:
            row = json.loads(line)
            kind = row.pop("kind")
            result[{"case": "rows", "sweep": "sweep", "compile": "compile_times"}[kind]].append(row)
        add_ratios(result["rows"])
    result.update(exit_code=rc, seconds=round(time.monotonic() - t0, 1),
                  plots=[str(p) for p in sorted(out.glob("*.png"))])
    return result


def merge_family(bench: dict, family: dict) -> None:
    """The family phase's rows and skips into the benchmark's result, so that the summary
    table, the failure check and ``bench table`` see one list of rows; its sweep and run
    details go under bench["family"].

    Args:
        bench: the main benchmark's result (rows, skipped), changed in place; the ratios are
            recomputed (they compare rows of the same shape, dtype and mode only).
        family: the family run's result (:func:`run_bench`).
    """
    bench.setdefault("rows", []).extend(family.get("rows", []))
    bench.setdefault("skipped", []).extend(f"family: {s}" for s in family.get("skipped", []))
    add_ratios(bench["rows"])
    bench["family"] = {k: family.get(k) for k in ("exit_code", "seconds", "sweep")}


def run_extra(name: str, cmd: list[str], cap: float, work: Path) -> dict:
    """One of the optional phases (a script writing JSON to work/<name>.json), capped."""
    out = work / f"{name}.json"
    cmd = [sys.executable, *cmd, "--out", str(out)]
    print(f"== {name} (cap {cap:.0f} s): {' '.join(cmd[1:])}", flush=True)
    t0 = time.monotonic()
    rc, output = run_capped(cmd, cap, work / f"{name}.log")
    result = {"exit_code": rc, "seconds": round(time.monotonic() - t0, 1),
              "output_tail": output[-3000:]}
    if out.exists():
        result["results"] = json.loads(out.read_text())
    return result


def extra_phases(args) -> list[tuple[str, list[str]]]:
    """The optional phases asked for: (name, script and its arguments)."""
    phases = []
    if args.profile:
        cases = [a for c in args.profile for a in ("--case", c)]
        phases.append(("profile", ["bench/profile_step.py", *cases,
                                   *(["--dry-run"] if args.dry_run else [])]))
    if args.convs:
        phases.append(("convs", ["bench/bench_convs.py",
                                 *(["--dry-run"] if args.dry_run else shlex.split(args.convs))]))
    if args.fused:
        phases.append(("fused", ["bench/bench_fused_step.py",
                                 *(["--dry-run"] if args.dry_run else shlex.split(args.fused))]))
    return phases


def goals(rows: list[dict]) -> list[dict]:
    """The fast-path goals read off the benchmark rows: layer vs the best compile mode. "met" is
    None unless both compile modes were measured (one alone may not be the best)."""
    found = []
    for r in rows:
        goal = GOALS.get((r["mode"], r["shape"]))
        if r["impl"] != "layer" or goal is None or not r.get("speedup_vs_compiled"):
            continue
        case = (r["shape"], r["dtype"], r["mode"])
        modes = sorted(o["impl"] for o in rows if o["impl"] in ("compiled", "compiled-ro")
                       and o.get("median_ms") and (o["shape"], o["dtype"], o["mode"]) == case)
        found.append({"shape": r["shape"], "dtype": r["dtype"], "mode": r["mode"],
                      "speedup_vs_best_compile": r["speedup_vs_compiled"], "goal": goal,
                      "compile_modes": modes,
                      "met": r["speedup_vs_compiled"] >= goal if len(modes) == 2 else None})
    return found


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=float, default=330.0, help="wall-clock cap for everything")
    p.add_argument("--tests-share", type=float, default=0.4,
                   help="share of the budget the tests may use (default 0.4)")
    p.add_argument("--out", help="JSON path (default bench/results/<gpu-name>.json)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: test the plumbing")
    p.add_argument("--test-paths", nargs="+", default=["tests", "bench/test_perf.py"],
                   help="what pytest -m gpu runs (default: tests bench/test_perf.py)")
    p.add_argument("--marker", default="gpu",
                   help="pytest -m expression for the tests ('' runs everything in the paths)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="pytest-xdist workers for the unit tests (default: half the cores, at "
                        "most 8, where xdist is installed; else 1); the perf gates run alone")
    p.add_argument("--bench-args", default="",
                   help="extra options for the bench command, e.g. '--impls layer,eager'")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true",
                   help="run no benchmark (the family phase included)")
    p.add_argument("--family-share", type=float, default=0.2,
                   help="share of the budget for the family phase (1-d, 3-d and bidirectional "
                        "shapes against eager; default 0.2, 0 skips it); run before the 2-d "
                        "benchmark, which gets what it leaves")
    p.add_argument("--family-args", default="",
                   help="extra options for the family phase's bench command, e.g. "
                        "'--dtype bf16,fp32'")
    p.add_argument("--profile", action="append", metavar="CASE",
                   help="also profile SHAPE:DTYPE:MODE:IMPL (bench/profile_step.py), e.g. "
                        "M:bf16:train:layer-nographs; repeatable; runs before the benchmark")
    p.add_argument("--convs", nargs="?", const="--shapes S,M,L --rounds 5 --reps 5", default=None,
                   metavar="ARGS",
                   help="also time split vs cat convolutions (bench/bench_convs.py) with ARGS "
                        "(default '--shapes S,M,L --rounds 5 --reps 5'); runs before the benchmark")
    p.add_argument("--fused", nargs="?", const="--shapes M,S,L --dtype bf16 --sweep --rounds 3 "
                   "--reps 5", default=None, metavar="ARGS",
                   help="also time the fused forward step against the split one, sweeping its "
                        "tiles (bench/bench_fused_step.py) with ARGS (default '--shapes M,S,L "
                        "--dtype bf16 --sweep --rounds 3 --reps 5': M first, the goal it "
                        "targets); runs before the benchmark")
    p.add_argument("--extras-share", type=float, default=0.25,
                   help="share of the budget the optional phases may use together")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    left = lambda: args.budget_s - MARGIN_S - (time.monotonic() - START)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device visible; use --dry-run to try this on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    name = "cpu-dry-run" if args.dry_run else slug(torch.cuda.get_device_name())
    default_dir = Path(tempfile.gettempdir()) if args.dry_run else ROOT / "bench" / "results"
    out = Path(args.out) if args.out else default_dir / f"{name}.json"
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    report = {"meta": environment(device), "budget_s": args.budget_s, "dry_run": args.dry_run,
              "package": ensure_importable()}
    print(f"package: {report['package']}", flush=True)

    if not args.skip_tests:
        share = 1.0 if args.skip_bench else args.tests_share
        report["tests"] = run_all_tests(min(args.budget_s * share, left()), work,
                                        args.test_paths, args.marker, args.workers)
    phases = extra_phases(args)
    for phase, cmd in phases:  # each gets an equal part of its share, never more than is left
        cap = min(args.budget_s * args.extras_share / len(phases), left())
        if cap > 5:
            report[phase] = run_extra(phase, cmd, cap, work)
    family = None
    # Before the 2-d run and capped: its ~18 cases are cheap, while the 2-d run's compiled
    # baselines would take any time left; what the family leaves goes to the 2-d run.
    if not args.skip_bench and args.family_share > 0:
        cap = min(args.budget_s * args.family_share, left())
        if cap > 5:
            # A third of a small cap kept back, not 15 s: a short budget (a dry run's) would
            # otherwise leave the phase no time at all; its cases are seconds each at most.
            family = run_bench(cap, work, args.dry_run, shlex.split(args.family_args),
                               name="family", base=family_args(args.dry_run),
                               margin_s=min(15.0, cap / 3))
        else:
            family = {"rows": [], "skipped": ["no time left for the family phase"]}
    if not args.skip_bench and left() > 5:
        report["bench"] = run_bench(left(), work, args.dry_run, shlex.split(args.bench_args))
    elif not args.skip_bench:
        report["bench"] = {"skipped": ["no time left for the benchmark"], "rows": []}
    if family is not None:
        merge_family(report["bench"], family)
    if not args.skip_bench:
        report["goals"] = goals(report["bench"]["rows"])
    report["elapsed_s"] = round(time.monotonic() - START, 1)

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print("\n== summary")
    if "tests" in report:
        t = report["tests"]
        print(f"tests: {t['status']} {t['counts']} in {t['seconds']} s")
        for line in t["failures"]:
            print(f"  {line}")
    if "bench" in report:
        print(format_table({"compile_times": [], **report["bench"]}))
    for g in report.get("goals", []):
        verdict = {True: "met", False: "MISSED"}.get(g["met"], f"(only {g['compile_modes']})")
        print(f"goal {g['mode']:<5} {g['shape']} {g['dtype']}: "
              f"{g['speedup_vs_best_compile']:.2f}x vs best compile (goal {g['goal']}x) {verdict}")
    copies = [out]
    if os.environ.get("OUT"):  # the device runner returns what lands in $OUT
        dest = Path(os.environ["OUT"])
        dest.mkdir(parents=True, exist_ok=True)
        extra = report.get("bench", {}).get("plots", []) + [
            str(work / f"{part}.log") for part in ("tests", "perf-gates")]
        for src in [out, *map(Path, extra)]:
            target = dest / (out.name if src == out else f"{name}-{src.name}")
            # --out may already be in $OUT (copying a file onto itself raises).
            if src.exists() and src.resolve() != target.resolve():
                copies.append(Path(shutil.copy(src, target)))
    print(f"wrote {', '.join(map(str, copies))} in {report['elapsed_s']} s")
    failed = report.get("tests", {}).get("status") == "failed"
    broken = any(r.get("error") for r in report.get("bench", {}).get("rows", []))
    return 1 if failed or broken else 0


if __name__ == "__main__":
    sys.exit(main())
