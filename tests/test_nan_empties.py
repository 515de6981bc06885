"""The test session allocates NaN-filled memory on CPU (conftest._nan_filled_empties), so a
kernel or loop that reads memory it never wrote fails loudly: check the fixture is in force."""

import torch


def test_fresh_cpu_allocations_hold_nan():
    assert torch.empty(3).isnan().all()
    assert torch.empty_like(torch.ones(2, 3)).isnan().all()
    assert torch.empty_strided((2, 2), (1, 2)).isnan().all()
    assert torch.ones(1, dtype=torch.bfloat16).new_empty(4).isnan().all()
    leaf = torch.empty(2, requires_grad=True)
    assert leaf.requires_grad and leaf.is_leaf and leaf.isnan().all()
    assert torch.empty(2, dtype=torch.int64).dtype == torch.int64  # integers are left alone


def test_the_device_context_still_redirects_the_wrapped_factories():
    with torch.device("meta"):
        assert torch.empty(2).is_meta and torch.empty_like(torch.ones(1)).is_meta
