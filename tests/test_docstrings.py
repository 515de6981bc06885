"""The ``>>>`` examples in the package's docstrings run as written (Triton ones in the
interpreter on CPU, as the rest of the suite)."""

import doctest
import importlib
import pkgutil

import pytest

import triton_convlstm

MODULES = sorted(m.name for m in pkgutil.walk_packages(triton_convlstm.__path__,
                                                       "triton_convlstm."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_the_examples_are_found():
    """The modules that show usage do have examples (a silent collection of none would pass)."""
    for name in ("triton_convlstm", "triton_convlstm.modules", "triton_convlstm.ops",
                 "triton_convlstm.kernels.gates", "triton_convlstm.kernels.fused_step"):
        finder = doctest.DocTestFinder()
        tests = finder.find(importlib.import_module(name))
        assert sum(len(t.examples) for t in tests) > 0, name
