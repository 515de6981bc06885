"""Split or cat: which way should a ConvLSTM layer run its convolutions, per shape and dtype?

split: one input conv over all T*B frames + T hidden convs (and an add per step to sum them).
cat:   T convs of cat([x_t, h]) with the stacked weight (the cat is a copy per step).
train adds the backward convolutions each way needs (see ``split_train`` / ``cat_train``).
Only convolutions, channels_last, bias-free, kernel 3 'same', on random data made up front.
On CUDA each variant is one CUDA graph, replays timed with CUDA events, split and cat taking
turns round by round; the speedup is the median over rounds of split_ms / cat_ms.

    python bench/bench_convs.py [--device cuda|cpu] [--shapes S,M,L] [--dtype bf16,fp32]
        [--modes fwd,train] [--rounds N] [--reps N] [--out FILE.json] [--dry-run]

From another script: ``run(shapes, dtypes, modes, device, rounds, reps) -> list[dict]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from functools import partial

import torch
import torch.nn.functional as F

from triton_convlstm.apps.bench.cases import DTYPES, SHAPES, Shape, graphed, interleaved, ratio_of

CL = torch.channels_last
ONE, PAD = [1, 1], [1, 1]  # stride/dilation and the padding of a 3x3 'same' conv
DX, DW = [True, False, False], [False, True, False]  # input- or weight-gradient only
MARGIN = 1.05  # a variant must be >5% faster to be picked: less is within noise


def make_case(shape: Shape, dt: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Random tensors for one layer, time-major so step s is the contiguous block [s*B:(s+1)*B]."""
    assert shape.kernel == 3, "PAD assumes kernel 3"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, t, c, hid, n = shape.batch, shape.steps, shape.in_dim, shape.hidden, shape.size

    def rand(*size):
        return torch.randn(size, generator=gen).to(device, dt).contiguous(memory_format=CL)

    w_x, w_h = rand(4 * hid, c, 3, 3), rand(4 * hid, hid, 3, 3)
    return {
        "b": b, "t": t,
        "x": rand(t * b, c, n, n), "h": rand(t * b, hid, n, n), "dz": rand(t * b, 4 * hid, n, n),
        "w_x": w_x, "w_h": w_h,
        # The same weights stacked, so both variants compute the same gates.
        "w": torch.cat([w_x, w_h], 1).contiguous(memory_format=CL),
        # Training keeps the T cat frames for the batched weight gradient: one buffer, sliced.
        "xh": torch.empty(t * b, c + hid, n, n, device=device, dtype=dt, memory_format=CL),
    }


def _steps(c):
    return [slice(s * c["b"], (s + 1) * c["b"]) for s in range(c["t"])]


def split_forward(c) -> list[torch.Tensor]:
    """Gate pre-activations per step: the batched input conv plus each step's hidden conv."""
    zx = F.conv2d(c["x"], c["w_x"], padding=PAD)
    return [zx[sl] + F.conv2d(c["h"][sl], c["w_h"], padding=PAD) for sl in _steps(c)]


def cat_forward(c, store: bool = False) -> list[torch.Tensor]:
    """Gate pre-activations per step: one conv of cat([x_t, h]); ``store`` writes the cat into
    the training buffer (the same copy, kept for the weight gradient)."""
    out = []
    for sl in _steps(c):
        pair = [c["x"][sl], c["h"][sl]]
        xh = torch.cat(pair, 1, out=c["xh"][sl]) if store else torch.cat(pair, 1)
        out.append(F.conv2d(xh, c["w"], padding=PAD))
    return out


def _grad(dz, inp, w, mask):
    return torch.ops.aten.convolution_backward(dz, inp, w, None, ONE, PAD, ONE, False, [0, 0], 1,
                                               mask)


def split_train(c) -> None:
    split_forward(c)
    for sl in _steps(c):  # the recurrence forces one dh conv per step
        _grad(c["dz"][sl], c["h"][sl], c["w_h"], DX)
    _grad(c["dz"], c["x"], c["w_x"], DX)  # dx, batched over all T*B frames
    _grad(c["dz"], c["x"], c["w_x"], DW)  # dW_x, batched
    _grad(c["dz"], c["h"], c["w_h"], DW)  # dW_h, batched


def cat_train(c) -> None:
    cat_forward(c, store=True)
    for sl in _steps(c):  # dx_t and dh together, per step
        _grad(c["dz"][sl], c["xh"][sl], c["w"], DX)
    _grad(c["dz"], c["xh"], c["w"], DW)  # dW over the stored cat frames, batched


def verdict(speedup: float) -> str:
    return "cat" if speedup > MARGIN else "split" if speedup < 1 / MARGIN else "same"


def run(shapes, dtypes, modes, device, rounds: int = 7, reps: int = 10) -> list[dict]:
    """One row per (shape, dtype, mode); shapes are names in SHAPES, dtypes keys of DTYPES."""
    device = torch.device(device)
    rows = []
    for name in shapes:
        shape = SHAPES[name]
        for dname in dtypes:
            case = make_case(shape, DTYPES[dname], device)
            for mode in modes:
                bodies = {"split": split_forward, "cat": cat_forward} if mode == "fwd" else \
                    {"split": split_train, "cat": cat_train}
                with torch.no_grad():
                    steps = {k: graphed(partial(f, case), device) for k, f in bodies.items()}
                    times = interleaved(steps, device, rounds=rounds, reps=reps)
                speedup = ratio_of(times["cat"], times["split"])  # split_ms / cat_ms per round
                rows.append({
                    "shape": name, "label": shape.label, "dtype": dname, "mode": mode,
                    "split_ms": statistics.median(times["split"]),
                    "cat_ms": statistics.median(times["cat"]),
                    "speedup": speedup, "verdict": verdict(speedup),
                    "rounds": rounds, "reps": reps,
                })
                del steps  # free the graphs' memory pools before the next case
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"))
    p.add_argument("--shapes", default="S,M,L")
    p.add_argument("--dtype", default="bf16,fp32")
    p.add_argument("--modes", default="fwd,train")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", help="write the rows as JSON here")
    p.add_argument("--dry-run", action="store_true", help="cpu, cpu-s, fp32, 2 rounds of 1 rep")
    a = p.parse_args(argv)
    if a.dry_run:
        a.device, a.shapes, a.dtype, a.rounds, a.reps = "cpu", "cpu-s", "fp32", 2, 1
    if a.device is None:
        if not torch.cuda.is_available():
            p.error("no CUDA device: pass --device cpu (with CPU shapes, e.g. --shapes cpu-s) "
                    "or --dry-run")
        a.device = "cuda"
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    shapes, dtypes, modes = (s.split(",") for s in (a.shapes, a.dtype, a.modes))
    for vals, known in ((shapes, SHAPES), (dtypes, DTYPES), (modes, ("fwd", "train"))):
        if bad := [v for v in vals if v not in known]:
            p.error(f"unknown {bad}; choose from {list(known)}")
    if a.device == "cpu":
        torch.set_num_threads(1)  # one thread: steadier CPU numbers

    rows = run(shapes, dtypes, modes, a.device, a.rounds, a.reps)
    print(f"{'shape':<30} {'dtype':<5} {'mode':<6} {'split ms':>9} {'cat ms':>9} "
          f"{'cat/split':>9}  verdict")
    for r in rows:
        print(f"{r['shape'] + ' ' + r['label']:<30} {r['dtype']:<5} {r['mode']:<6} "
              f"{r['split_ms']:>9.3f} {r['cat_ms']:>9.3f} {r['speedup']:>8.2f}x  {r['verdict']}")
    if a.out:
        meta = {"torch": torch.__version__,
                "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
