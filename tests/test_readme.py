"""README promises: its performance table is generated from committed results, and CI runs the
test command it shows."""

import re
from pathlib import Path

from triton_convlstm.bench_report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_performance_table_is_generated_from_committed_results(monkeypatch):
    monkeypatch.chdir(ROOT)  # the table names its files relative to the repository
    command = re.search(r"`python -m triton_convlstm bench table ([^`]+)`", README)
    assert command, "README names the command that generated its table"
    files = [ROOT / p for p in command.group(1).split()]
    assert all(f.exists() for f in files), files
    shown = README.split("<!-- perf-table -->")[1].split("<!-- /perf-table -->")[0].strip()
    generated = markdown_table([f.relative_to(ROOT) for f in files]).strip()
    assert shown == generated


def test_ci_runs_the_readme_test_command():
    assert "bash run.sh demo" in README and "bash run.sh test" in README
    assert "bash run.sh test" in (ROOT / ".ci" / "run").read_text()
