"""Per-step time of the Triton gate kernels against eager torch and torch.compile (CUDA only).

For each size, dtype (bf16, fp32) and layout (NCHW, channels_last) it times one gate update
forward (training: zx + zh + bias, saving z) and backward (dh + recurrent dh2 + dc) with
triton.testing.do_bench (median), the same math in eager torch (triton_convlstm.reference) and
torch.compile of it, and reports the kernels' achieved bandwidth (the bytes each must move)
against a device-to-device copy measured in the same run.

    python bench/bench_gates.py [--quick] [--no-compile] [--json bench/results/gates.json]

From another script: ``from bench.bench_gates import run; numbers = run(json_path=None)``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

SIZES = [(16, 64, 64, 64), (16, 32, 64, 64), (8, 128, 128, 128)]  # (B, hidden, H, W)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("nchw", "nhwc")


def _bench(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # microseconds


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written, per second."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / (_bench(lambda: y.copy_(x)) * 1e-6) / 1e9


def step_bytes(b, hid, hh, ww, elem):
    """Bytes the fused kernels must move per step (fp32 cell state, no peepholes)."""
    n = b * hid * hh * ww
    fwd = n * (4 * elem + 4 * elem + 4) + 4 * hid * elem + n * (elem + 4 + 4 * elem)
    bwd = n * (4 * elem + 4 + 4 + elem + elem + 4) + n * (4 * elem + 4)
    return fwd, bwd


def _eager_forward(zx, zh, bias, c_prev):
    from triton_convlstm.reference import gate_forward_ref

    return gate_forward_ref(zx + zh + bias[:, None, None], c_prev)


def _eager_backward(z, c_prev, c, dh, dh2, dc):
    from triton_convlstm.reference import gate_backward_ref

    return gate_backward_ref(z, c_prev, c, None, dh + dh2, dc)


def bench_case(b, hid, hh, ww, dtype, layout, compile_baseline=True):
    from triton_convlstm.kernels.gates import gate_backward, gate_forward

    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    mk = lambda ch, dt=dtype: torch.randn(b, ch, hh, ww, device="cuda", dtype=dt).contiguous(
        memory_format=fmt)  # fmt: skip
    zx, zh, c_prev = mk(4 * hid), mk(4 * hid), mk(hid, torch.float32)
    bias = torch.randn(4 * hid, device="cuda", dtype=dtype)
    h, c, z = mk(hid), mk(hid, torch.float32), mk(4 * hid)
    dh, dh2, dc = mk(hid), mk(hid), mk(hid, torch.float32)
    dz, dcp = mk(4 * hid), mk(hid, torch.float32)

    times = {
        "fwd": {
            "triton": _bench(lambda: gate_forward(zx, zh, bias, c_prev, None, h_out=h, c_out=c,
                                                   z_out=z)),
            "eager": _bench(lambda: _eager_forward(zx, zh, bias, c_prev)),
        },
        "bwd": {
            "triton": _bench(lambda: gate_backward(z, c_prev, c, None, dh, dh2, dc, dz_out=dz,
                                                    dc_prev_out=dcp)),
            "eager": _bench(lambda: _eager_backward(z, c_prev, c, dh, dh2, dc)),
        },
    }  # fmt: skip
    if compile_baseline:
        fwd_c = torch.compile(_eager_forward, dynamic=False)
        bwd_c = torch.compile(_eager_backward, dynamic=False)
        times["fwd"]["compiled"] = _bench(lambda: fwd_c(zx, zh, bias, c_prev))
        times["bwd"]["compiled"] = _bench(lambda: bwd_c(z, c_prev, c, dh, dh2, dc))
    return times


def run(json_path: str | None = None, quick: bool = False, compile_baseline: bool = True) -> dict:
    """Time every case; returns (and with json_path writes) {"device", "copy_gbps", "rows"}."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_gates needs a CUDA device")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    copy = copy_bandwidth_gbps()
    rows = []
    for b, hid, hh, ww in SIZES[:1] if quick else SIZES:
        for dname, dtype in DTYPES.items():
            for layout in LAYOUTS:
                times = bench_case(b, hid, hh, ww, dtype, layout, compile_baseline)
                nbytes = dict(zip(("fwd", "bwd"), step_bytes(b, hid, hh, ww, dtype.itemsize)))
                for op, t in times.items():
                    gbps = nbytes[op] / (t["triton"] * 1e-6) / 1e9
                    rows.append(dict(B=b, hidden=hid, H=hh, W=ww, dtype=dname, layout=layout,
                                     op=op, us=t, bytes=nbytes[op], gbps=gbps,
                                     copy_fraction=gbps / copy))  # fmt: skip
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_gbps": copy, "rows": rows}  # fmt: skip
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def print_table(result: dict) -> None:
    print(f"{result['device']}: device-to-device copy {result['copy_gbps']:.0f} GB/s")
    head = (f"{'B,hid,HxW':>16} {'dtype':>5} {'layout':>6} {'op':>3} {'triton us':>9} "
            f"{'eager us':>9} {'compiled':>9} {'x eager':>7} {'x comp':>7} {'GB/s':>6} "
            f"{'%copy':>6}")  # fmt: skip
    print(head)
    for r in result["rows"]:
        t = r["us"]
        comp = t.get("compiled", float("nan"))
        print(f"{r['B']:>4},{r['hidden']:>3},{r['H']}x{r['W']:<5} {r['dtype']:>5} {r['layout']:>6} "
              f"{r['op']:>3} {t['triton']:>9.1f} {t['eager']:>9.1f} {comp:>9.1f} "
              f"{t['eager'] / t['triton']:>7.2f} {comp / t['triton']:>7.2f} {r['gbps']:>6.0f} "
              f"{100 * r['copy_fraction']:>5.0f}%")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the numbers here")
    parser.add_argument("--quick", action="store_true", help="only the first size")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gates: no CUDA device; this benchmark runs on GPUs only", file=sys.stderr)
        return 1
    print_table(run(args.json, quick=args.quick, compile_baseline=not args.no_compile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
