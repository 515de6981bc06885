import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, so CI exercises the real
# kernels. Triton reads this when a kernel is decorated: it must be set before any import of
# triton_convlstm.kernels, hence here, at conftest import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Compiled graphs from this run only: inductor's on-disk cache outlives the checkout (in /tmp)
# and does not key on custom ops' fake kernels (pytorch/pytorch#160472), so a graph compiled
# by older code could be reused with its old strides.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-tests-")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# For modules whose tests run on DEVICE (`pytestmark = DEVICE_MARKS`): on a CUDA machine they
# are GPU tests, so `pytest -m gpu` (bench/gpu_check.py) runs them there; on CPU they are not.
DEVICE_MARKS = [pytest.mark.gpu] if DEVICE == "cuda" else []


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def _poisoned(make):
    """``make`` (torch.empty and its kin), with CPU floating-point results filled with NaN."""
    def wrapper(*args, **kwargs):
        t = make(*args, **kwargs)
        if t.device.type == "cpu" and t.is_floating_point():
            with torch.no_grad():  # also for requires_grad=True: the fill is not part of it
                t.fill_(float("nan"))
        return t
    wrapper.poisoned = True
    return wrapper


@pytest.fixture(autouse=True)
def _nan_filled_empties(monkeypatch):
    """Freshly allocated tensors hold NaN on CPU (as flash-linear-attention's tests do): a
    kernel or loop that reads memory it never wrote then fails loudly instead of passing on
    whatever the allocator left there (often zeros on a fresh page). Covers the Python-level
    allocators the package calls: torch.empty, empty_like, empty_strided, Tensor.new_empty."""
    # torch.device("meta") redirects the factory functions it listed when first asked (a cached
    # set of torch.empty and kin): list the real ones before they are wrapped.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in ("empty", "empty_like", "empty_strided"):
        monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
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


@pytest.fixture
def conv_outputs(monkeypatch):
    """The outputs of every convolution the sequence loops run (sequence.conv_same), in order:
    for tests that check which buffer a loop computed into."""
    from triton_convlstm import sequence

    outputs, real = [], sequence.conv_same

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        outputs.append(out)
        return out

    monkeypatch.setattr(sequence, "conv_same", spy)
    return outputs
