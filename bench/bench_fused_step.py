"""Does the fused forward step beat the split one, and with which tiles? (CUDA; --dry-run: the
CPU interpreter on a tiny shape, to test the plumbing.)

split: what the layer's inference forward runs now: one input convolution over all T*B frames,
       then per step the hidden convolution (cuDNN, channels_last, no bias) and the gate kernel.
fused: per step one kernels/fused_step.py launch, for each tile configuration tried.
Each variant is the whole sequence captured in one CUDA graph; each fused config takes turns
with the split step, round by round; times are medians per sequence (split_ms over all its
rounds). ``speedup`` is the best config's median over rounds of split / fused time.

    python bench/bench_fused_step.py [--shapes S,M,L] [--dtype bf16,fp32] [--sweep]
        [--rounds N] [--reps N] [--out FILE.json] [--dry-run]

Without --sweep only the launcher's default tiles run; with it, every BLOCK_M x BLOCK_C x
num_warps x num_stages in SWEEP that fits the hidden size.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # the interpreter must be on before Triton reads any kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402

from triton_convlstm.apps.bench.cases import (  # noqa: E402
    DTYPES,
    SHAPES,
    Shape,
    graphed,
    interleaved,
    ratio_of,
)
from triton_convlstm.layout import seq_frames  # noqa: E402
from triton_convlstm.sequence import (  # noqa: E402
    LayerSpec,
    _layer_forward_fused,
    layer_forward,
)

CL = torch.channels_last
SWEEP = {"BLOCK_M": (64, 128), "BLOCK_C": (32, 64), "num_warps": (4, 8), "num_stages": (2, 3)}
DRY = Shape("dry", 1, 2, 3, 4, 5)
# One small config: the override's plumbing, at the interpreter's pace.
DRY_SWEEP = {"BLOCK_M": (16,), "BLOCK_C": (16,), "num_warps": (4,), "num_stages": (2,)}


def make_case(shape: Shape, dt: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, t, c, hid, n = shape.batch, shape.steps, shape.in_dim, shape.hidden, shape.size

    def rand(*size, scale=1.0):
        return (scale * torch.randn(size, generator=gen)).to(device, dt)

    k = shape.kernel
    return {"x": rand(t, b, c, n, n), "weight": rand(4 * hid, c + hid, k, k, scale=0.1),
            "bias": rand(4 * hid, scale=0.1)}


def split_forward(case) -> torch.Tensor:
    spec = LayerSpec((1, 1), "triton")
    return layer_forward(case["x"], case["weight"], case["bias"], None, None, None, spec,
                         False)[0]


def fused_forward(case, config=None) -> torch.Tensor:
    """The layer's fused inference loop (sequence._layer_forward_fused) with tiles ``config``."""
    spec = LayerSpec((1, 1), "triton", fused=True)
    x = case["x"]
    return _layer_forward_fused(x, case["weight"], case["bias"], None, None, None, spec, False,
                                seq_frames(x), config)[0]


def configs(hidden: int, sweep: bool, grid=None) -> list[dict | None]:
    """None (the launcher's default tiles), then those of ``grid`` (SWEEP) that fit
    ``hidden``."""
    if not sweep:
        return [None]
    grid = grid or SWEEP
    out = [None]
    for values in itertools.product(*grid.values()):
        cfg = dict(zip(grid, values))
        if cfg["BLOCK_C"] <= max(16, 1 << (hidden - 1).bit_length()):
            out.append(cfg)
    return out


def _name(cfg) -> str:
    if cfg is None:
        return "default"
    return "m{BLOCK_M}-c{BLOCK_C}-w{num_warps}-s{num_stages}".format(**cfg)


def run(shapes, dtypes, device, sweep=False, rounds=5, reps=10, grid=None, on_row=None):
    """One row per (shape, dtype), filled in one tile config at a time: each config is
    captured, then timed against the split step in rounds that take turns, and ``on_row(rows)``
    is called after each, so a run cut off mid-sweep keeps every config it finished (a sweep at
    M compiles ~30 kernels, longer than a GPU session's phase may be)."""
    device = torch.device(device)
    rows = []
    for shape in shapes:
        for dname in dtypes:
            case = make_case(shape, DTYPES[dname], device)
            row = {"shape": shape.name, "label": shape.label, "dtype": dname, "split_ms": None,
                   "fused_default_ms": None, "best": None, "best_ms": None, "speedup": None,
                   "configs_ms": {}, "configs_speedup": {}, "errors": {}, "rounds": rounds,
                   "reps": reps}
            rows.append(row)
            split_times: list[float] = []
            with torch.no_grad():
                try:
                    split = graphed(partial(split_forward, case), device)
                except Exception as exc:
                    row["errors"]["split"] = f"{type(exc).__name__}: {exc}"[:300]
                    split = None
                for cfg in configs(shape.hidden, sweep, grid):
                    name = _name(cfg)
                    try:  # a config that does not fit (shared memory...) is reported, not fatal
                        step = graphed(partial(fused_forward, case, cfg), device)
                        pair = {name: step} if split is None else {"split": split, name: step}
                        times = interleaved(pair, device, rounds=rounds, reps=reps)
                    except Exception as exc:
                        row["errors"][name] = f"{type(exc).__name__}: {exc}"[:300]
                        continue
                    split_times += times.get("split", [])
                    row["configs_ms"][name] = statistics.median(times[name])
                    if "split" in times:  # round by round, against the split step beside it
                        row["configs_speedup"][name] = ratio_of(times[name], times["split"])
                    _summarise(row, split_times)
                    if on_row is not None:
                        on_row(rows)
                    del step, pair
            del split, case
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if on_row is not None:
                on_row(rows)
    return rows


def _summarise(row: dict, split_times: list[float]) -> None:
    """The best config by its own round-by-round speedup over the split step (each config was
    timed beside it, so clock drift over a long sweep cancels), else by its time."""
    fused, speedups = row["configs_ms"], row["configs_speedup"]
    row["split_ms"] = statistics.median(split_times) if split_times else None
    row["fused_default_ms"] = fused.get("default")
    row["best"] = (max(speedups, key=speedups.get) if speedups
                   else min(fused, key=fused.get))
    row["best_ms"] = fused[row["best"]]
    row["speedup"] = speedups.get(row["best"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="S,M,L")
    p.add_argument("--dtype", default="bf16,fp32")
    p.add_argument("--sweep", action="store_true", help="also every tile config in SWEEP")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU interpreter, a tiny shape, fp32, one sweep config, 1 round of 1 rep")
    a = p.parse_args(argv)
    if a.dry_run:
        device, shapes, dtypes, a.rounds, a.reps = "cpu", [DRY], ["fp32"], 1, 1
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device (the fused step is a Triton kernel); try --dry-run")
        device = "cuda"
        names, dtypes = a.shapes.split(","), a.dtype.split(",")
        for vals, known in ((names, SHAPES), (dtypes, DTYPES)):
            if bad := [v for v in vals if v not in known]:
                p.error(f"unknown {bad}; choose from {list(known)}")
        shapes = [SHAPES[n] for n in names]
    meta = {"torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}

    def write(rows):
        if a.out:
            with open(a.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)

    rows = run(shapes, dtypes, device, a.sweep or a.dry_run, a.rounds, a.reps,
               DRY_SWEEP if a.dry_run else SWEEP, on_row=write)
    print(f"{'shape':<28} {'dtype':<5} {'split ms':>9} {'fused ms':>9} {'best':>22} "
          f"{'best ms':>8} {'split/best':>10}")
    for r in rows:
        fmt = lambda v, w=9: f"{v:>{w}.3f}" if v is not None else f"{'-':>{w}}"  # noqa: E731
        speed = f"{r['speedup']:>9.2f}x" if r["speedup"] else f"{'-':>10}"
        print(f"{r['shape'] + ' ' + r['label']:<28} {r['dtype']:<5} {fmt(r['split_ms'])} "
              f"{fmt(r['fused_default_ms'])} {str(r['best']):>22} {fmt(r['best_ms'], 8)} {speed}")
        for name, err in r["errors"].items():
            print(f"  {name}: {err}")
    write(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
