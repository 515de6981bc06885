"""The bench command's reports: the ratios each row carries, the text table it prints, its plots,
and ``python -m triton_convlstm bench table RESULTS.json [MORE.json ...]``, the README's table.

``bench table`` merges the rows of committed gpu_check/bench results (a later file's row
replaces an earlier one for the same implementation, shape, dtype and mode, so a rerun of the
layer keeps the compile baselines measured before) and prints a Markdown table with each file's
provenance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import ArgumentParser, UsageError, read_json
from .cases import COMPILED_IMPLS

SHAPE_ORDER = {"S": 0, "M": 1, "L": 2}


def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_eager = eager ms / ms and speedup_vs_compiled = best compiled ms / ms, both for
    the same shape, dtype and mode (None where the other side is missing).

    Args:
        rows: result rows (impl, shape, dtype, mode, median_ms); both keys are set in each, in
            place, rounded to 3 decimals.
    """
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
    "cpu": "most bytes alive at once of tensors created in one step "
           "(triton_convlstm.apps.bench.memory); no weights, inputs, workspaces or RSS; not for "
           "compiled steps",
    "cuda": "max_memory_allocated in one step above what was allocated before the case",
}


def format_table(result: dict) -> str:
    """The rows (and compile times, skips) as aligned text.

    Args:
        result: a bench result (:func:`~.command.run_benchmark`): its "rows" (with ratios),
            and "compile_times" and "skipped" where present.

    Returns:
        The table, lines joined by newlines (no trailing one); a failed row shows its error, a
        missing number "-", and a line explains the peak MiB of each device with one.
    """
    def f(v, spec):  # spec like "9.2f"; "-" in the same width when missing
        return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)

    # The shape column fits the longest name (cpu-s-bi), at least the 7 the 2-d names had.
    sw = max([7] + [len(r["shape"]) + 1 for r in result["rows"]])
    lines = [f"{'impl':<16}{'shape':<{sw}}{'dtype':<6}{'mode':<6}{'median ms':>11}"
             f"{'x eager':>9}{'x compiled':>12}{'peak MiB':>10}"]
    for r in sorted(result["rows"], key=lambda r: (r["shape"], r["dtype"], r["mode"])):
        if r.get("error"):
            lines.append(f"{r['impl']:<16}{r['shape']:<{sw}}{r['dtype']:<6}{r['mode']:<6}"
                         f"  error: {r['error']}")
            continue
        lines.append(f"{r['impl']:<16}{r['shape']:<{sw}}{r['dtype']:<6}{r['mode']:<6}"
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
    """time_vs_T.png (training step vs T, first shape) and speedup.png (speedup over eager).

    Args:
        result: a bench result with "sweep" and "rows" (with ratios).
        out: the folder the PNGs go to.

    Returns:
        The files written: each plot only where it has data.
    """
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


def _load(path: Path) -> tuple[dict, list[dict]]:
    data = read_json(path)
    # gpu_check wraps the bench result; bench writes it bare
    bench = data.get("bench", data) if isinstance(data, dict) else None
    if not isinstance(bench, dict) or not isinstance(bench.get("rows"), list):
        raise UsageError(f"{path}: not a bench results.json or gpu_check report (no rows)")
    meta = data.get("meta") or bench.get("meta") or {}
    return meta, [r for r in bench.get("rows", []) if r.get("median_ms") and not r.get("error")]


def merged_rows(paths: list[Path]) -> tuple[list[dict], list[str]]:
    """The timed rows of several result files, a later file's row replacing an earlier one for
    the same implementation, shape, dtype and mode.

    Args:
        paths: bench results.json files or gpu_check reports, oldest first.

    Returns:
        (rows, sources): the rows, each with ``source`` set to its file's number (from 1), and
        one provenance line per file ("[i] `path`: gpu or device, torch, triton, date").

    Raises:
        UsageError: naming a file that cannot be read or holds no rows.
    """
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
    """The README's table: per shape, dtype and mode with a layer row, eager, best compile,
    layer and convs-only ms, the layer's speedups and its peak memory over eager's.

    Args:
        paths: as for :func:`merged_rows`; the best compile and layer times are followed by
            their file's number.

    Returns:
        The Markdown table, a blank line, then the files' provenance lines.
    """
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
        compiled = [t for t in (ms(i, case) for i in COMPILED_IMPLS) if t[0] is not None]
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
    """``bench table``: print the Markdown table of the given result files.

    Args:
        argv: the arguments after ``bench table``.

    Returns:
        0.

    Raises:
        UsageError: for a bad argument or an unusable file.
    """
    p = ArgumentParser(prog="python -m triton_convlstm bench table", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path,
                   help="results.json of the bench command or gpu_check reports, oldest first")
    print(markdown_table(p.parse_args(argv).results))
    return 0
