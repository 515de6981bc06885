import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, so CI exercises the real
# kernels. Triton reads this when a kernel is decorated: it must be set before any import of
# triton_convlstm.kernels, hence here, at conftest import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# For modules whose tests run on DEVICE (`pytestmark = DEVICE_MARKS`): on a CUDA machine they
# are GPU tests, so `pytest -m gpu` (bench/gpu_check.py) runs them there; on CPU they are not.
DEVICE_MARKS = [pytest.mark.gpu] if DEVICE == "cuda" else []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch):
    """Float32 is compared with float64 (or with another path) at ~1e-5: cuDNN's default TF32
    convolutions (the default nn.Conv2d runs with, and the fused step's fp32 dots follow) are
    ~1e-3 off, so every test runs without them."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "cpu"])
def graph_device(request, monkeypatch):
    """Each device with CUDA graphs: real ones on CUDA (marked gpu), the emulated cache
    (graphs.EMULATE_ON_CPU) on CPU; the cache starts and ends empty."""
    from triton_convlstm import graphs

    if request.param == "cpu":
        monkeypatch.setattr(graphs, "EMULATE_ON_CPU", True)
    graphs.clear()
    yield request.param
    graphs.clear()
