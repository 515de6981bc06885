"""TensorMemoryTracker: exact peaks for known allocation patterns, no double counting of views or
in-place results, backward ops seen, frees subtracted, repeatable on a real training step."""

import gc

import pytest
import torch

from triton_convlstm.apps.bench.cases import SHAPES, build_step
from triton_convlstm.apps.bench.memory import TensorMemoryTracker

MiB = 2**20


def mib(n: float = 1.0) -> torch.Tensor:
    return torch.empty(int(n * MiB) // 4, dtype=torch.float32)


def test_freed_tensor_no_longer_counts_toward_the_peak():
    with TensorMemoryTracker() as mem:
        a = mib(1)
        del a
        b = mib(2)
        del b
    assert mem.peak_bytes == 2 * MiB
    assert mem.current_bytes == 0


def test_tensors_alive_together_add_up():
    with TensorMemoryTracker() as mem:
        a = mib(1)
        b = mib(2)
        del a, b
        c = mib(0.5)
    assert mem.peak_bytes == 3 * MiB
    assert mem.current_bytes == MiB // 2  # c is still alive, and counted until it dies
    del c
    assert mem.current_bytes == 0


def test_views_share_their_base_storage():
    with TensorMemoryTracker() as mem:
        a = mib(1)
        views = [a[::2], a.view(256, -1), a.view(256, -1).t(), a[10:20], a.unsqueeze(0),
                 *a.split(1000), a.detach(), a.as_strided((4,), (1,))]
        del a
    assert mem.peak_bytes == MiB
    assert mem.current_bytes == MiB  # the views keep the storage alive
    del views
    assert mem.current_bytes == 0


def test_in_place_ops_are_not_counted_again():
    with TensorMemoryTracker() as mem:
        a = mib(1).zero_()
        a.add_(1).mul_(2)
        torch.add(a, 1, out=a)
        a[:10] = 3.0
        torch._foreach_add_([a], 1.0)  # returns None
    assert mem.peak_bytes == MiB
    del a
    assert mem.current_bytes == 0


def test_tensors_from_before_the_call_are_not_counted():
    x = mib(1).zero_()
    with TensorMemoryTracker() as mem:
        x.add_(1)
        x[:100].fill_(2.0)
        assert x.sum().item() > 0  # a 4-byte sum, freed at once, and a Python number back
        y = x * 2
    assert mem.peak_bytes == MiB
    del y
    assert mem.current_bytes == 0


def test_out_argument_resized_is_counted_at_its_new_size_once():
    a = mib(1)
    with TensorMemoryTracker() as mem:
        out = torch.empty(0)
        torch.add(a, 1, out=out)
        torch.add(a, 2, out=out)
    assert mem.peak_bytes == MiB
    del out
    assert mem.current_bytes == 0


class _AllocatesInBackward(torch.autograd.Function):
    """Identity whose backward allocates (and drops) a 4 MiB scratch tensor."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        scratch = torch.zeros(MiB, dtype=torch.float32)
        return grad + scratch[: grad.numel()].view_as(grad)


class _PlainBackward(_AllocatesInBackward):
    @staticmethod
    def backward(ctx, grad):
        return grad * 1.0


@pytest.mark.parametrize("how", ["grad", "backward"])
def test_allocations_in_a_custom_backward_are_seen(how):
    x = torch.randn(256, requires_grad=True)

    def peak(fn):
        with TensorMemoryTracker() as mem:
            loss = fn.apply(x).sum()
            if how == "grad":
                torch.autograd.grad(loss, [x])
            else:
                loss.backward()
                x.grad = None
            del loss
        assert mem.current_bytes == 0
        return mem.peak_bytes

    plain, scratch = peak(_PlainBackward), peak(_AllocatesInBackward)
    assert plain < 16 * 1024
    assert 4 * MiB <= scratch < 4 * MiB + 16 * 1024


def test_reset_peak_starts_from_what_is_alive():
    with TensorMemoryTracker() as mem:
        a = mib(2)
        del a
        b = mib(1)
        mem.reset_peak()
        c = mib(0.5)
    assert mem.peak_bytes == MiB + MiB // 2
    del b, c


def test_training_step_peak_is_repeatable_and_leaves_nothing_alive():
    step = build_step("eager", SHAPES["cpu-s"], "fp32", "train", torch.device("cpu"))
    step()
    peaks = []
    for _ in range(2):
        gc.collect()
        with TensorMemoryTracker() as mem:
            step()
        assert mem.current_bytes == 0
        peaks.append(mem.peak_bytes)
    # Above the saved activations alone: T steps of 4 gates (B, 4*hid, H, W) in fp32.
    s = SHAPES["cpu-s"]
    assert peaks[0] == peaks[1] > s.steps * s.batch * 4 * s.hidden * s.size**2 * 4


def test_bench_table_says_what_cpu_peak_memory_means():
    from triton_convlstm.apps.bench.report import format_table

    row = {"impl": "layer", "shape": "cpu-s", "dtype": "fp32", "mode": "train", "device": "cpu",
           "median_ms": 1.0, "speedup_vs_eager": 1.0, "speedup_vs_compiled": None,
           "peak_mem_mb": 2.5}
    lines = format_table({"rows": [row]}).splitlines()
    assert lines[1].endswith("2.5")
    assert lines[2].startswith("peak MiB (cpu): ") and "cuda" not in lines[2].lower()


def test_the_text_table_fits_long_shape_names():
    from triton_convlstm.apps.bench.report import format_table

    row = dict(impl="layer", shape="cpu-s-bi", dtype="fp32", mode="train", median_ms=1.0,
               speedup_vs_eager=1.0, speedup_vs_compiled=None, peak_mem_mb=None)
    line = format_table({"rows": [row]}).splitlines()[1]
    assert "cpu-s-bi fp32" in line
