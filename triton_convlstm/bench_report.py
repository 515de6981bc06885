"""``python -m triton_convlstm bench table RESULTS.json [MORE.json ...]``: the README's table.

Merges the rows of committed gpu_check/bench results (a later file's row replaces an earlier
one for the same implementation, shape, dtype and mode, so a rerun of the layer keeps the
compile baselines measured before) and prints a Markdown table with each file's provenance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .benchmark import UsageError, _Parser, read_json

COMPILED = ("compiled", "compiled-ro")
SHAPE_ORDER = {"S": 0, "M": 1, "L": 2}


def _load(path: Path) -> tuple[dict, list[dict]]:
    data = read_json(path)
    # gpu_check wraps the bench result; bench writes it bare
    bench = data.get("bench", data) if isinstance(data, dict) else None
    if not isinstance(bench, dict) or not isinstance(bench.get("rows"), list):
        raise UsageError(f"{path}: not a bench results.json or gpu_check report (no rows)")
    meta = data.get("meta") or bench.get("meta") or {}
    return meta, [r for r in bench.get("rows", []) if r.get("median_ms") and not r.get("error")]


def merged_rows(paths: list[Path]) -> tuple[list[dict], list[str]]:
    rows: dict[tuple, dict] = {}
    sources = []
    for i, path in enumerate(paths, 1):
        meta, file_rows = _load(path)
        sources.append(f"[{i}] `{path.as_posix()}`: {meta.get('gpu') or meta.get('device', '?')}, "
                       f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, "
                       f"{str(meta.get('date', '?'))[:16]}")
        for r in file_rows:
            rows[(r["impl"], r["shape"], r["dtype"], r["mode"])] = dict(r, source=i)
    return list(rows.values()), sources


def markdown_table(paths: list[Path]) -> str:
    rows, sources = merged_rows(paths)
    get = {(r["impl"], r["shape"], r["dtype"], r["mode"]): r for r in rows}
    cases = sorted({(r["shape"], r["dtype"], r["mode"]) for r in rows},
                   key=lambda c: (SHAPE_ORDER.get(c[0], 9), c[0], c[1], c[2] != "train"))

    def ms(impl, case):
        r = get.get((impl, *case))
        return (r["median_ms"], r["source"]) if r else (None, None)

    head = ("| shape | dtype | mode | eager ms | best compile ms | layer ms | convs only ms "
            "| layer vs eager | layer vs best compile | layer / eager peak memory |")
    lines = [head, "|" + "---|" * 10]
    for case in cases:
        eager, _ = ms("eager", case)
        layer, src = ms("layer", case)
        if layer is None:
            continue
        compiled = [t for t in (ms(i, case) for i in COMPILED) if t[0] is not None]
        best, csrc = min(compiled) if compiled else (None, None)
        convs, _ = ms("convs-only", case)
        le, ee = get.get(("layer", *case)), get.get(("eager", *case))
        mem = (f"{le['peak_mem_mb'] / ee['peak_mem_mb']:.2f}"
               if le and ee and le.get("peak_mem_mb") and ee.get("peak_mem_mb") else "-")

        def fmt(v, s=None):
            return "-" if v is None else f"{v:.3f}" + (f" [{s}]" if s else "")

        lines.append(
            f"| {case[0]} | {case[1]} | {case[2]} | {fmt(eager)} | {fmt(best, csrc)} "
            f"| {fmt(layer, src)} | {fmt(convs)} "
            f"| {'-' if not eager else f'{eager / layer:.2f}x'} "
            f"| {'-' if not best else f'{best / layer:.2f}x'} | {mem} |")
    return "\n".join(lines + [""] + [f"{s}  " for s in sources])


def main(argv: list[str]) -> int:
    p = _Parser(prog="python -m triton_convlstm bench table", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path,
                   help="results.json of the bench command or gpu_check reports, oldest first")
    print(markdown_table(p.parse_args(argv).results))
    return 0
