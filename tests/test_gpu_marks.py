"""Every test module that runs on conftest.DEVICE carries DEVICE_MARKS, so that on a CUDA
machine `pytest -m gpu` (what bench/gpu_check.py runs in its one device call) includes it.
A module that forgot would run its CUDA cases only in a full, unmarked run."""

import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _uses_device(text: str) -> bool:
    return re.search(r"\bDEVICE\b", text) is not None


@pytest.mark.parametrize("path", sorted(p.relative_to(TESTS).as_posix()
                                         for p in TESTS.rglob("test_*.py")))
def test_modules_on_DEVICE_carry_the_gpu_mark(path):
    text = (TESTS / path).read_text()
    if path == Path(__file__).name or not _uses_device(text):
        return
    assert re.search(r"^pytestmark = DEVICE_MARKS$", text, re.M), (
        f"{path} runs on conftest.DEVICE: add `pytestmark = DEVICE_MARKS`")
    assert not re.search(r"^DEVICE = ", text, re.M), f"{path}: import DEVICE from conftest"


def test_the_check_walks_every_test_folder():
    folders = {p.parent.name for p in TESTS.rglob("test_*.py")}
    assert {"kernels", "lib", "apps"} <= folders


def test_the_check_sees_a_module_without_the_mark():
    assert _uses_device("x = torch.ones(2, device=DEVICE)")
    assert not _uses_device("DEVICES = ['cpu']")
