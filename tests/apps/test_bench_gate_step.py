"""apps/bench/gate_step.py: the perf suite's gate-update step, through the C kernels or the
torch ops."""

import pytest

from triton_convlstm.apps.bench.gate_step import GATE_STEP_IMPLS, build_gate_step


def test_both_steps_run_and_an_unknown_impl_is_refused():
    for impl in GATE_STEP_IMPLS:
        build_gate_step(impl, 2, 3, 5)()
    with pytest.raises(ValueError, match="impl: expected one of"):
        build_gate_step("fused", 2, 3, 5)


def test_the_native_step_runs_the_kernels(monkeypatch):
    from triton_convlstm import native_gates

    calls = []
    for name in ("gate_forward", "gate_backward"):
        real = getattr(native_gates, name)
        monkeypatch.setattr(native_gates, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    build_gate_step("native", 2, 3, 5)()
    assert calls == ["gate_forward", "gate_backward"]
    calls.clear()
    build_gate_step("torch-ops", 2, 3, 5)()
    assert calls == []
