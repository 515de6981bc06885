"""``python -m triton_convlstm bench``: this layer against the common formulation.

    python -m triton_convlstm bench --device cuda --dtype bf16 --shapes S,M --modes train
    python -m triton_convlstm bench compare OLD.json NEW.json --threshold 0.10

The first prints a table (median ms, speedup over eager and over the best torch.compile, peak
memory) and writes DIR/results.json and PNG plots; the second compares two pytest-benchmark JSON
files (or two results.json) and fails on a slowdown. What one case measures:
cases.py; the tables and plots: report.py; the comparison: compare.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..cli import ArgumentParser, UsageError, import_failure, unwritable
from .cases import (
    COMPILED_IMPLS,
    CPU_SHAPES,
    CUDA_ONLY_IMPLS,
    DTYPES,
    GPU_SHAPES,
    IMPLS,
    MODES,
    SHAPES,
    compile_seconds,
    run_case,
)
from .report import add_ratios, format_table, save_plots


def _csv(choices):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return items

    return parse


def _ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 4,8,16")
    return values


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m triton_convlstm bench", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--dtype", type=_csv(tuple(DTYPES)), help="default: bf16,fp32 (cuda), fp32")
    p.add_argument("--shapes", type=_csv(tuple(SHAPES)), help="default: S,M,L (cuda), cpu-s,cpu-m")
    p.add_argument("--modes", type=_csv(MODES), default=list(MODES),
                   help="fwd (no grad), train (forward and backward); default: fwd,train")
    p.add_argument("--impls", type=_csv(IMPLS), help="default: all (cuda), eager,layer (cpu)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per case (at least)")
    p.add_argument("--target-s", type=float, default=0.3,
                   help="cuda: raise the repeats to fill about this many seconds per case")
    p.add_argument("--sweep", type=_ints,
                   help="T values for the time-vs-T plot (first shape, train); default 4,8,16,32 "
                        "(cuda), 2,4,8 (cpu)")
    p.add_argument("--compile-times", choices=("on", "off"),
                   help="first-call time of torch.compile(fullgraph=True) at T=8 and T=64; "
                        "default on (cuda), off (cpu: the C++ compiler takes minutes)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadiest on a busy box)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True for every implementation: cuDNN "
                        "times its algorithms per shape instead of picking by heuristics")
    p.add_argument("--budget-s", type=float,
                   help="skip cases (and say so) once they would not fit in this many seconds")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs (needs no matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar (needs no tqdm)")
    p.add_argument("--out", default="bench_out", help="folder for results.json, rows.jsonl, PNGs")
    return p


def _resolve(args) -> None:
    """Fill device-dependent defaults and reject combinations that cannot run."""
    cuda = torch.cuda.is_available()
    args.device = args.device or ("cuda" if cuda else "cpu")
    if args.device == "cuda" and not cuda:
        raise UsageError("--device cuda: no CUDA device is visible to torch")
    gpu = args.device == "cuda"
    args.dtype = args.dtype or (["bf16", "fp32"] if gpu else ["fp32"])
    args.shapes = args.shapes or list(GPU_SHAPES if gpu else CPU_SHAPES)
    args.impls = args.impls or (list(IMPLS) if gpu else ["eager", "layer"])
    if not gpu and (bad := [i for i in args.impls if i in CUDA_ONLY_IMPLS]):
        raise UsageError(f"--impls {','.join(bad)}: needs --device cuda")
    args.sweep = args.sweep or ([4, 8, 16, 32] if gpu else [2, 4, 8])
    args.compile_times = (args.compile_times or ("on" if gpu else "off")) == "on"
    if args.repeats < 1:
        raise UsageError("--repeats: expected at least 1")
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads: expected at least 1")
    if args.budget_s is not None and not (math.isfinite(args.budget_s) and args.budget_s > 0):
        raise UsageError(f"--budget-s: expected a positive number of seconds, got {args.budget_s}")
    if not (math.isfinite(args.target_s) and args.target_s >= 0):
        raise UsageError(f"--target-s: expected a number of seconds >= 0, got {args.target_s}")
    # Before any case runs, not after minutes of them.
    if not args.quiet:
        _need("tqdm", "the progress bar (--quiet runs without it)")
    if not args.no_plots:
        _need("matplotlib", "the plots (--no-plots runs without them)")
    reason = unwritable(Path(args.out))
    if reason is not None:
        raise UsageError(f"--out {args.out}: cannot write there ({reason})")


def _need(module: str, what: str) -> None:
    failure = import_failure(module)
    if failure is not None:
        raise UsageError(f"{what} needs {module} (in the bench extra): "
                         f"pip install -e \".[bench]\"" + (f" ({failure})" if failure else ""))


def _plan(args):
    """Jobs in priority order, so that a budget cuts the least informative ones: every case
    without a compile first, then the layer's compile-time probes (cheap: its time loop is one
    op), then both compile modes case by case (the goals compare with the better one), then the
    formulation's compile-time probes (the compiler unrolls T), then the T sweep for the plot."""
    grid = [(s, d, m) for s in args.shapes for d in args.dtype for m in args.modes]
    compiled = [i for i in args.impls if i in COMPILED_IMPLS]
    jobs = [("case", i, s, d, m, None) for s, d, m in grid for i in args.impls
            if i not in compiled]
    probes = [("compile", i, args.shapes[0], args.dtype[0], "train", t)
              for i in ("layer", "eager") for t in (8, 64)] if args.compile_times else []
    jobs += probes[:2]
    jobs += [("case", i, s, d, m, None) for s, d, m in grid for i in compiled]
    jobs += probes[2:]
    if "train" in args.modes:
        jobs += [("sweep", i, args.shapes[0], args.dtype[0], "train", t)
                 for i in args.impls for t in args.sweep]
    return jobs


def _cost_key(job) -> tuple:
    kind, impl, *_ = job
    return (kind, impl) if kind == "compile" else (kind, impl in COMPILED_IMPLS)


def _scale(job) -> float:
    # The formulation's compile time grows with T (the compiler unrolls the loop); the layer's
    # should not. Probes are recorded per T=8 and scaled back up.
    kind, impl, *_, steps = job
    return steps / 8 if kind == "compile" and impl == "eager" else 1.0


def _guess_s(job, seen: dict) -> float:
    """What a job will cost, from the most expensive similar one seen so far (or a guess)."""
    key = _cost_key(job)
    expensive = key[0] == "compile" or key[1] is True
    like_case = ("case", key[1]) if key[0] == "sweep" else None
    per = seen.get(key, seen.get(like_case, 60.0 if expensive else 2.0))
    return per * _scale(job)


def run_benchmark(args: argparse.Namespace, emit: Callable[..., object] = print) -> dict:
    """Run the planned jobs; rows go to DIR/rows.jsonl as they finish (a killed run keeps them).

    Jobs run in priority order, and with ``args.budget_s`` a job that would not fit in the time
    left is skipped and listed.

    Args:
        args: the parsed and resolved (device-dependent defaults filled) command line.
        emit: not used.

    Returns:
        The result: "meta" (:func:`environment`), "rows" (one per case, with the speedup
        ratios), "sweep" (the time-vs-T rows), "compile_times" and "skipped" (one line each).
    """
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = (out / "rows.jsonl").open("w")
    result = {"meta": environment(device, args), "rows": [], "sweep": [], "compile_times": [],
              "skipped": []}
    jobs = _plan(args)
    bar = None if args.quiet else _progress(len(jobs))
    start, seen = time.perf_counter(), {}
    for job in jobs:
        kind, impl, shape_name, dtype, mode, steps = job
        shape = SHAPES[shape_name] if steps is None else SHAPES[shape_name].with_steps(steps)
        what = f"{kind} {impl} {shape_name} T={shape.steps} {dtype} {mode}"
        if bar is not None:
            bar.set_description(what)
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
        if left is not None and _guess_s(job, seen) > left:
            result["skipped"].append(f"{what}: would not fit in the {left:.0f} s left")
        else:
            t0 = time.perf_counter()
            if kind == "compile":
                row = {"impl": impl, "shape": shape_name, "steps": steps, "dtype": dtype}
                try:
                    row["seconds"] = round(compile_seconds(impl, shape, dtype, device), 2)
                except Exception as exc:  # e.g. a graph break under fullgraph=True
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                result["compile_times"].append(row)
            else:
                row = run_case(impl, shape, dtype, mode, device, reps=args.repeats,
                               target_s=args.target_s)
                result["rows" if kind == "case" else "sweep"].append(row)
            key = _cost_key(job)
            seen[key] = max(seen.get(key, 0.0), (time.perf_counter() - t0) / _scale(job))
            stream.write(json.dumps({"kind": kind, **row}) + "\n")
            stream.flush()
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    stream.close()
    add_ratios(result["rows"])
    return result


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="case", file=sys.stderr, leave=False)


def environment(device: torch.device, args: argparse.Namespace | None = None) -> dict:
    """Versions and machine, stored with every result file.

    Args:
        device: the device benchmarked (its type, and the GPU's name on CUDA).
        args: the run's command line; its ``argv`` attribute is recorded (None without one).

    Returns:
        date (UTC), python, torch, triton (None when not importable), device, platform, gpu,
        cpu_threads, cudnn_benchmark and argv.
    """
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # no Triton (CPU-only installs): the torch path still runs
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__,
        "triton": triton_version, "device": device.type, "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "argv": getattr(args, "argv", None),
    }


def bench_main(argv: list[str]) -> int:
    """The benchmark run: print the table, write DIR/results.json and the plots.

    Args:
        argv: the arguments after ``bench``.

    Returns:
        1 when a case failed (a row with an error), else 0.

    Raises:
        UsageError: for a bad argument or one that cannot run here, before any case runs.
    """
    args = _parser().parse_args(argv)
    _resolve(args)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # the run's files say which
    result = run_benchmark(args)
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(format_table(result))
    plots = [] if args.no_plots else save_plots(result, out)
    print(f"wrote {out / 'results.json'}" + "".join(f", {p}" for p in plots))
    return 1 if any(r.get("error") for r in result["rows"]) else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m triton_convlstm bench``: the run, ``compare`` or ``table``.

    Args:
        argv: the arguments after ``bench``; None reads ``sys.argv[1:]``.

    Returns:
        The exit status of the subcommand, or 2 for a bad argument (with a one-line message on
        stderr).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["compare"]:
            from .compare import main as compare_main

            return compare_main(argv[1:])
        if argv[:1] == ["table"]:
            from .report import main as table_main

            return table_main(argv[1:])
        return bench_main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
