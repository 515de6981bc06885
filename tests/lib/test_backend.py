"""Which implementation runs (triton_convlstm.backend.resolve_backend), including where Triton
does not import: faked by setting the cached probe result, so this runs on every machine."""

import pytest
import torch

from triton_convlstm import ConvLSTM, backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")  # only the device type is read


@pytest.fixture
def probe(monkeypatch):
    """Set what the Triton import probe found (None: it imported)."""
    def set_probe(result):
        monkeypatch.setattr(backend, "_PROBE", [result])
    return set_probe


def test_auto_picks_triton_on_cuda_and_torch_elsewhere(probe):
    probe(None)
    assert backend.resolve_backend("auto", CUDA, torch.float32) == "triton"
    assert backend.resolve_backend("auto", CUDA, torch.bfloat16) == "triton"
    assert backend.resolve_backend("auto", CPU, torch.float32) == "torch"
    assert backend.resolve_backend("auto", CUDA, torch.float64) == "torch"  # kernels are fp32
    assert backend.resolve_backend("torch", CUDA, torch.float32) == "torch"


def test_without_triton_auto_falls_back_and_triton_says_why(probe, monkeypatch):
    probe("ModuleNotFoundError: No module named 'triton'")
    assert backend.resolve_backend("auto", CUDA, torch.float32) == "torch"
    with pytest.raises(RuntimeError, match=r"backend='triton' needs Triton, which failed to "
                                           r"import \(ModuleNotFoundError: No module named"):
        backend.resolve_backend("triton", CUDA, torch.float32)
    x = torch.randn(1, 2, 2, 4, 4)
    outs, _ = ConvLSTM(2, 3, 3, 1, batch_first=True)(x)  # "auto": the torch path, no error
    assert outs[0].shape == (1, 2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="failed to import"):
        ConvLSTM(2, 3, 3, 1, batch_first=True, backend="triton")(x)


def test_triton_on_cpu_needs_the_interpreter(probe, monkeypatch):
    probe(None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"got tensors on cpu; .*TRITON_INTERPRET=1"):
        backend.resolve_backend("triton", CPU, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.resolve_backend("triton", CPU, torch.float32) == "triton"
