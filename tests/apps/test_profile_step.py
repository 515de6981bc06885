"""bench/profile_step.py: the per-kernel (CUDA) / per-op (CPU) breakdown of one benchmark step."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("profile_step", ROOT / "bench" / "profile_step.py")
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


def test_dry_run_writes_a_breakdown(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert profile_step.main(["--dry-run", "--steps", "1", "--top", "5", "--out", str(out)]) == 0
    (result,) = json.loads(out.read_text())
    assert result["case"] == "cpu-s:fp32:train:layer" and result["cpu_self_ms_per_step"] > 0
    rows = result["rows"]
    assert 0 < len(rows) <= 5
    assert [r["ms_per_step"] for r in rows] == sorted((r["ms_per_step"] for r in rows),
                                                      reverse=True)
    assert any("convolution" in r["name"] for r in rows)  # the step's biggest ops are convs
    assert 0 < sum(r["share"] for r in rows) <= 1.0 + 1e-9
    assert "cpu-s:fp32:train:layer on cpu" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["cpu-s:fp32:train", "X:fp32:train:layer"])
def test_bad_case_names_the_format(case):
    with pytest.raises(ValueError, match="SHAPE:DTYPE:MODE:IMPL"):
        profile_step.parse_case(case)
