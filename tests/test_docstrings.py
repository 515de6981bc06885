"""The ``>>>`` examples in the package's docstrings run as written (Triton ones in the
interpreter on CPU, as the rest of the suite)."""

import doctest
import importlib
import pkgutil

import pytest
import triton_convlstm.kernels

import triton_convlstm

# The kernels live in kernels/ (installed as triton_convlstm.kernels through a package-dir
# mapping, which pkgutil does not walk from the package): listed from their own package.
MODULES = sorted(m.name for pkg in (triton_convlstm, triton_convlstm.kernels)
                 for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_the_examples_are_found():
    """The modules that show usage do have examples (a silent collection of none would pass)."""
    for name in ("triton_convlstm", "triton_convlstm.modules", "triton_convlstm.step_op",
                 "triton_convlstm.kernels.gates", "triton_convlstm.kernels.fused_step"):
        finder = doctest.DocTestFinder()
        tests = finder.find(importlib.import_module(name))
        assert sum(len(t.examples) for t in tests) > 0, name
