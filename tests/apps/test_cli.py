"""python -m triton_convlstm: the dispatcher and its info command."""

import subprocess
import sys

from triton_convlstm.__main__ import main


def test_info_prints_versions_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backend 'auto' on cpu: torch" in out
    # CI has a C compiler: the kernels must build
    assert "cpu kernels (gates, small 1-d/3-d convolutions) built: " in out
    assert "cpu 3x3 convolutions by Winograd F(2x2, 3x3) on" in out  # (torch's x86 sgemm)
    assert "cpu kernels' threads torch's OpenMP workers (" in out  # (the Linux wheel's libgomp)


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_info_help_and_stray_arguments(capsys):
    assert main(["info", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m triton_convlstm info")
    assert main(["info", "--verbose"]) == 2
    assert "info takes no arguments, got --verbose" in capsys.readouterr().err


def test_unknown_command_is_one_clear_error(capsys):
    assert main(["dance"]) == 2
    assert "unknown command 'dance'" in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "triton_convlstm", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout
