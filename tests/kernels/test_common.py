"""The launchers' shared plumbing (kernels/_common.py); its jitted math runs in every kernel test
(tests/kernels/test_gates.py, test_fused_step.py) and builds in test_kernel_build.py."""

import pytest
import torch
from triton_convlstm.kernels import _common, fused_step, gates
from triton_convlstm.kernels._common import SERVED_DTYPES, check_tensor, merged_strides


def test_one_copy_of_the_cell_math():
    """Both kernel modules use the same jitted cell update and launcher checks."""
    for name in ("cell_update", "load_peepholes", "check_tensor", "merged_strides"):
        assert getattr(gates, name) is getattr(_common, name)
        assert getattr(fused_step, name) is getattr(_common, name)


def test_merged_strides():
    t = torch.empty(2, 3, 4, 5)
    assert merged_strides(t) == (60, 20, 1)
    nhwc = t.contiguous(memory_format=torch.channels_last)
    assert merged_strides(nhwc) == (60, 1, 3)
    assert merged_strides(torch.empty(2, 3, 4, 1)) == (12, 4, 1)  # W == 1: H's stride
    assert merged_strides(torch.empty(2, 3, 1, 5)[:, :, :, 1:]) == (15, 5, 1)  # H == 1
    assert merged_strides(t[:, 1:]) == (60, 20, 1)  # a channel slice still merges
    assert merged_strides(t[:, :, :, 1:]) is None  # a crop: stride_h != W * stride_w


def test_merged_strides_1d_and_3d():
    """(B, C, L) and (B, C, D, H, W): every consecutive pair of spatial dims must merge
    (stride == next size * next stride), size-1 dims ignored."""
    line = torch.empty(2, 3, 7)
    assert merged_strides(line) == (21, 7, 1)
    assert merged_strides(torch.empty(2, 7, 3).movedim(-1, 1)) == (21, 1, 3)  # channels-last
    assert merged_strides(line[..., ::2]) == (21, 7, 2)  # one dim always merges
    assert merged_strides(torch.empty(2, 3, 1)) == (3, 1, 1)

    vol = torch.empty(2, 3, 4, 5, 6)
    assert merged_strides(vol) == (360, 120, 1)
    assert merged_strides(vol.contiguous(memory_format=torch.channels_last_3d)) == (360, 1, 3)
    assert merged_strides(vol[:, 1:, 1:]) == (360, 120, 1)  # channel and depth slices merge
    assert merged_strides(vol[:, :, :, 1:]) is None  # stride_d != H * stride_h
    assert merged_strides(vol[..., 1:]) is None  # stride_h != W * stride_w
    assert merged_strides(vol[..., ::2]) == (360, 120, 2)  # stride_h 6 == 3 * 2: a stride of 2
    # size-1 dims are skipped, whatever their strides: D then W must merge across H == 1
    assert merged_strides(torch.empty(2, 3, 4, 1, 6).as_strided((2, 3, 4, 1, 6),
                                                                (72, 24, 6, 99, 1))) == (72, 24, 1)
    assert merged_strides(torch.empty(2, 3, 4, 2, 6)[:, :, :, :1]) is None  # 12 != 6 * 1
    assert merged_strides(torch.empty(2, 3, 1, 1, 1)) == (3, 1, 1)  # one pixel: D's stride


def test_check_tensor_names_the_argument():
    t, cpu = torch.zeros(2, 3), torch.device("cpu")
    check_tensor("x", t, (2, 3), SERVED_DTYPES, cpu)
    check_tensor("x", None, (2, 3), SERVED_DTYPES, cpu, optional=True)
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor, got None"):
        check_tensor("x", None, (2, 3), SERVED_DTYPES, cpu)
    with pytest.raises(TypeError, match="^x: expected a torch.Tensor, got list"):
        check_tensor("x", [1.0], (1,), SERVED_DTYPES, cpu)
    with pytest.raises(TypeError, match="^x: expected dtype .*backend='torch'"):
        check_tensor("x", t.double(), (2, 3), SERVED_DTYPES, cpu)
    with pytest.raises(ValueError, match=r"^x: expected shape \(3, 2\), got \(2, 3\)"):
        check_tensor("x", t, (3, 2), SERVED_DTYPES, cpu)
    with pytest.raises(ValueError, match="^x: expected a tensor on meta"):
        check_tensor("x", t, (2, 3), SERVED_DTYPES, torch.device("meta"))
