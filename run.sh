#!/usr/bin/env bash
# One-command set-up and run: `bash run.sh demo [demo options]` or `bash run.sh test [pytest args]`.
# Creates .venv on first use and installs the package with what that command needs.
set -euo pipefail
cd "$(dirname "$0")"
cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  demo) extras="demo" ;;
  test) extras="test,demo,bench" ;;
  *) echo "usage: bash run.sh demo [options] | bash run.sh test [pytest args]" >&2; exit 2 ;;
esac

py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
. .venv/bin/activate
stamp=".venv/.installed-$extras-$(cksum < pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first, pinned: a plain range would pull whatever build the index offers first.
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi

if [ "$cmd" = demo ]; then
  exec python -m triton_convlstm demo "$@"
fi
python -m ruff check .
if [ $# -gt 0 ]; then
  # Arguments select unit tests (`-k cell`, `tests/lib/test_cell.py`): those alone, as pytest runs
  # them (testpaths is tests/), not the whole suite plus a perf run that selects nothing.
  exec python -m pytest -q "$@"
fi
# The unit tests, then the CPU part of the performance-regression suite (same-run ratio gates),
# whose pytest-benchmark JSON goes to bench_out/perf-cpu.json (each run replaces it: copy it
# aside to compare a later run with `python -m triton_convlstm bench compare`).
mkdir -p bench_out
python -m pytest tests -q
python -m pytest bench/test_perf.py -q --benchmark-json=bench_out/perf-cpu.json
