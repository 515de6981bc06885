"""``python -m triton_convlstm bench compare OLD.json NEW.json``: two runs' medians case by case;
fails on a slowdown beyond a threshold, or on a case that failed in the new run."""

from __future__ import annotations

from ..cli import ArgumentParser, UsageError, read_json


def load_medians(path: str) -> dict[str, float | None]:
    """Case name -> median seconds, from a pytest-benchmark JSON (``--benchmark-json``) or from a
    results.json of this command (cases named impl/shape/dtype/mode; None for a case that
    failed there).

    Args:
        path: the JSON file.

    Returns:
        Case name (a benchmark's fullname, else its name) -> median seconds, or None.

    Raises:
        UsageError: naming the file, when it cannot be read, is neither format, or an entry
            lacks a median.
    """
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


def main(argv: list[str]) -> int:
    """Old and new median per case; exit 1 when a case got slower than 1 + threshold or failed
    in the new run, 2 when the files share no case.

    Args:
        argv: the arguments after ``bench compare``: OLD NEW [--threshold X].

    Returns:
        0 when no common case got slower or failed, else 1.

    Raises:
        UsageError: for a bad argument, an unusable file, or files that share no case (exit
            status 2 from the bench command).
    """
    p = ArgumentParser(prog="python -m triton_convlstm bench compare",
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
