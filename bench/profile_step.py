"""Where one step's time goes: the top kernels (CUDA) or ops (CPU) of a benchmark case.

    python bench/profile_step.py --case M:bf16:train:layer-nographs --out m.json
    python bench/profile_step.py --dry-run                # CPU, cpu-s fp32: the same plumbing

A case is SHAPE:DTYPE:MODE:IMPL as in ``python -m triton_convlstm bench``. The step is built and
warmed up exactly as the benchmark does (triton_convlstm.apps.bench.cases.build_step), then run
``--steps`` times under torch.profiler. On CUDA the rows are kernels by device time; on CPU, ops
by self CPU time. "layer-nographs" attributes time per kernel most reliably: inside a replayed
CUDA graph the profiler may see the graph, not its kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the GPU box runs from a plain checkout

from triton_convlstm.apps.bench.cases import SHAPES, build_step, sync  # noqa: E402


def parse_case(text: str) -> tuple[str, str, str, str]:
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in SHAPES:
        raise ValueError(f"--case: expected SHAPE:DTYPE:MODE:IMPL with SHAPE in {sorted(SHAPES)}, "
                         f"got {text!r}")
    return tuple(parts)


def breakdown(case: str, device: torch.device, steps: int = 3, top: int = 25) -> dict:
    """Profile ``steps`` calls of a warmed-up case; the ``top`` rows by time, per step."""
    shape, dtype, mode, impl = parse_case(case)
    step = build_step(impl, SHAPES[shape], dtype, mode, device)
    for _ in range(3):  # captures, compiles, picks algorithms: never profiled
        step()
    sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    rows = []
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append({"name": e.key, "ms_per_step": us / 1e3 / steps,
                         "calls_per_step": e.count / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    for r in rows:
        r["share"] = r["ms_per_step"] / total if total else 0.0
    return {"case": case, "device": str(device), "steps": steps,
            "wall_ms_per_step_profiled": wall_ms,
            ("device_ms_per_step" if cuda else "cpu_self_ms_per_step"): total,
            "rows": rows[:top]}


def format_breakdown(result: dict) -> str:
    total = result.get("device_ms_per_step", result.get("cpu_self_ms_per_step"))
    lines = [f"{result['case']} on {result['device']}: {total:.3f} ms per step in the rows' "
             f"kind, {result['wall_ms_per_step_profiled']:.3f} ms wall (profiled)"]
    for r in result["rows"]:
        lines.append(f"  {r['ms_per_step']:8.3f} ms {100 * r['share']:5.1f}% "
                     f"x{r['calls_per_step']:<6g} {r['name'][:90]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", help="SHAPE:DTYPE:MODE:IMPL (repeatable)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--dry-run", action="store_true", help="CPU, cpu-s: test the plumbing")
    args = p.parse_args(argv)
    if args.dry_run:  # the cases' modes and impls, at the CPU shape and dtype
        cases = [":".join(["cpu-s", "fp32", *parse_case(c)[2:]]) for c in args.case or []]
        device, cases = torch.device("cpu"), cases or ["cpu-s:fp32:train:layer"]
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print("error: no CUDA device visible; use --dry-run to try this on CPU", file=sys.stderr)
        return 2
    else:
        device, cases = torch.device("cuda"), args.case or ["M:bf16:train:layer-nographs"]
    results = []
    for case in cases:
        results.append(breakdown(case, device, args.steps, args.top))
        print(format_breakdown(results[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
