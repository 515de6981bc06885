"""``python -m triton_convlstm bench``: this layer against the common formulation.

    python -m triton_convlstm bench --device cuda --dtype bf16 --shapes S,M --modes train
    python -m triton_convlstm bench compare OLD.json NEW.json --threshold 0.10

The first prints a table (median ms, speedup over eager and over the best torch.compile, peak
memory) and writes DIR/results.json and PNG plots; the second compares two pytest-benchmark JSON
files (or two results.json) and fails on a slowdown. What one case measures: bench_cases.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from .bench_cases import (
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
from .cli_checks import import_failure, unwritable


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage and exit itself
        raise UsageError(message)


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
    p = _Parser(prog="python -m triton_convlstm bench", description=__doc__,
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


def run_benchmark(args, emit=print) -> dict:
    """Run the planned jobs; rows go to DIR/rows.jsonl as they finish (a killed run keeps them)."""
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


def environment(device: torch.device, args=None) -> dict:
    """Versions and machine, stored with every result file."""
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


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_eager = eager ms / ms and speedup_vs_compiled = best compiled ms / ms, both for
    the same shape, dtype and mode (None where the other side is missing)."""
    def best(impls, r):
        times = [o["median_ms"] for o in rows if o["impl"] in impls and o["median_ms"]
                 and (o["shape"], o["dtype"], o["mode"]) == (r["shape"], r["dtype"], r["mode"])]
        return min(times) if times else None

    for r in rows:
        eager, comp = best(("eager",), r), best(COMPILED_IMPLS, r)
        ms = r["median_ms"]
        r["speedup_vs_eager"] = round(eager / ms, 3) if ms and eager else None
        r["speedup_vs_compiled"] = round(comp / ms, 3) if ms and comp else None


# Both measure one warmed-up step but not the same thing: compare within a device only.
PEAK_MEMORY_MEANS = {
    "cpu": "most bytes alive at once of tensors created in one step (triton_convlstm.memory); "
           "no weights, inputs, workspaces or RSS; not for compiled steps",
    "cuda": "max_memory_allocated in one step above what was allocated before the case",
}


def format_table(result: dict) -> str:
    """The rows (and compile times, skips) as aligned text."""
    def f(v, spec):  # spec like "9.2f"; "-" in the same width when missing
        return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)

    lines = [f"{'impl':<16}{'shape':<7}{'dtype':<6}{'mode':<6}{'median ms':>11}"
             f"{'x eager':>9}{'x compiled':>12}{'peak MiB':>10}"]
    for r in sorted(result["rows"], key=lambda r: (r["shape"], r["dtype"], r["mode"])):
        if r.get("error"):
            lines.append(f"{r['impl']:<16}{r['shape']:<7}{r['dtype']:<6}{r['mode']:<6}"
                         f"  error: {r['error']}")
            continue
        lines.append(f"{r['impl']:<16}{r['shape']:<7}{r['dtype']:<6}{r['mode']:<6}"
                     f"{f(r['median_ms'], '11.3f')}{f(r['speedup_vs_eager'], '9.2f')}"
                     f"{f(r['speedup_vs_compiled'], '12.2f')}{f(r['peak_mem_mb'], '10.1f')}")
    devices = {r.get("device") for r in result["rows"] if r.get("peak_mem_mb") is not None}
    lines += [f"peak MiB ({d}): {PEAK_MEMORY_MEANS[d]}" for d in sorted(devices)
              if d in PEAK_MEMORY_MEANS]
    for c in result.get("compile_times", []):
        val = f"{c['seconds']:.1f} s" if "seconds" in c else c.get("error")
        lines.append(f"compile (fullgraph) {c['impl']:<6}{c['shape']} T={c['steps']:<3} "
                     f"{c['dtype']}: {val}")
    lines += [f"skipped: {s}" for s in result.get("skipped", [])]
    return "\n".join(lines)


def save_plots(result: dict, out: Path) -> list[Path]:
    """time_vs_T.png (training step vs T, first shape) and speedup.png (speedup over eager)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and GPU boxes have no display
    import matplotlib.pyplot as plt

    paths = []
    sweep = [r for r in result["sweep"] if r["median_ms"]]
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in dict.fromkeys(r["impl"] for r in sweep):
            pts = sorted((r["steps"], r["median_ms"]) for r in sweep if r["impl"] == impl)
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xlabel="sequence length T", ylabel="ms per training step",
               title=f"training step vs T ({sweep[0]['shape']}, {sweep[0]['dtype']})")
        ax.legend()
        paths.append(out / "time_vs_T.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    rows = [r for r in result["rows"] if r["speedup_vs_eager"]]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if rows:
        fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
        for ax, shape in zip(axes[0], shapes):
            mine = [r for r in rows if r["shape"] == shape]
            groups = list(dict.fromkeys(f"{r['dtype']}/{r['mode']}" for r in mine))
            impls = list(dict.fromkeys(r["impl"] for r in mine))
            width = 0.8 / len(impls)
            for k, impl in enumerate(impls):
                vals = {f"{r['dtype']}/{r['mode']}": r["speedup_vs_eager"]
                        for r in mine if r["impl"] == impl}
                ax.bar([g + k * width for g in range(len(groups))],
                       [vals.get(g, 0) for g in groups], width, label=impl)
            ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set(title=f"shape {shape}", ylabel="speedup over eager (x)")
        axes[0][0].legend(fontsize=8)
        paths.append(out / "speedup.png")
        fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
        plt.close(fig)
    return paths


def bench_main(argv: list[str]) -> int:
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


def read_json(path) -> object:
    """A JSON file's content; a UsageError naming the file if it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a JSON file ({exc})") from None


def load_medians(path: str) -> dict[str, float | None]:
    """Case name -> median seconds, from a pytest-benchmark JSON (``--benchmark-json``) or from a
    results.json of this command (cases named impl/shape/dtype/mode; None for a case that
    failed there)."""
    data = read_json(path)
    try:
        if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
            return {b.get("fullname") or b["name"]: float(b["stats"]["median"])
                    for b in data["benchmarks"]}
        if isinstance(data, dict) and isinstance(data.get("rows"), list):
            return {f"{r['impl']}/{r['shape']}/{r['dtype']}/{r['mode']}":
                    r["median_ms"] / 1e3 if r.get("median_ms") else None for r in data["rows"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"{path}: a benchmark entry lacks a median ({exc!r})") from None
    raise UsageError(f"{path}: neither pytest-benchmark JSON nor a bench results.json")


def compare_main(argv: list[str]) -> int:
    """Old and new median per case; exit 1 when a case got slower than 1 + threshold or failed
    in the new run, 2 when the files share no case."""
    p = _Parser(prog="python -m triton_convlstm bench compare",
                description="Compare two pytest-benchmark JSON files (or two results.json).")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="fail when new/old median exceeds 1 + this (default 0.10)")
    args = p.parse_args(argv)
    if not args.threshold >= 0:
        raise UsageError("--threshold: expected a number >= 0")
    old, new = load_medians(args.old), load_medians(args.new)
    common = [n for n in old if n in new]
    if not common:  # e.g. one file of each format: a pass would say nothing
        raise UsageError(f"{args.old} and {args.new} share no case: nothing to compare")
    width = max([len(n) for n in common] + [4])
    print(f"{'case':<{width}}  {'old ms':>10}  {'new ms':>10}  {'new/old':>8}")
    slower, failed = [], []
    for name in common:
        if new[name] is None:
            failed.append(name)
            print(f"{name:<{width}}  {'-' if old[name] is None else f'{old[name] * 1e3:.3f}':>10}"
                  f"  {'-':>10}  {'-':>8}  ERROR (failed in the new run)")
            continue
        if old[name] is None:
            print(f"{name:<{width}}  {'-':>10}  {new[name] * 1e3:>10.3f}  {'-':>8}"
                  "  (failed in the old run)")
            continue
        ratio = new[name] / old[name] if old[name] > 0 else float("inf")
        flag = ""
        if ratio > 1 + args.threshold:
            slower.append(name)
            flag = "  SLOWER"
        print(f"{name:<{width}}  {old[name] * 1e3:>10.3f}  {new[name] * 1e3:>10.3f}"
              f"  {ratio:>8.3f}{flag}")
    for label, names in (("only in old", [n for n in old if n not in new]),
                         ("only in new", [n for n in new if n not in old])):
        for name in names:
            print(f"{label}: {name}")
    if failed:
        print(f"{len(failed)} of {len(common)} cases failed in the new run: {', '.join(failed)}")
    if slower:
        print(f"{len(slower)} of {len(common)} cases slower by more than "
              f"{args.threshold:.0%}: {', '.join(slower)}")
    if failed or slower:
        return 1
    print(f"{len(common)} cases compared, none slower by more than {args.threshold:.0%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m triton_convlstm bench``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["compare"]:
            return compare_main(argv[1:])
        if argv[:1] == ["table"]:
            from .bench_report import main as table_main

            return table_main(argv[1:])
        return bench_main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
