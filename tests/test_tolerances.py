"""The shared float tolerances (tests/helpers.py) are relative to the reference's magnitude and
still fail on real differences."""
import math

import pytest
import torch

from helpers import assert_close_f32, max_scaled_diff


def test_relative_to_magnitude_and_fails_on_real_differences():
    ref = torch.tensor([457.34, 0.02, -3.0])
    assert_close_f32(ref + torch.tensor([2e-4, 0.0, 0.0]), ref)  # 4.4e-7 of the largest value
    assert_close_f32(ref + torch.tensor([2e-4, 1e-6, 0.0]), ref, elementwise=True)
    with pytest.raises(AssertionError, match="vb: max|diff|"):
        assert_close_f32(ref + torch.tensor([0.0, 1e-4, 0.0]), ref, elementwise=True, what="vb")
    with pytest.raises(AssertionError):
        assert_close_f32(torch.full((3,), 0.5 + 2e-5), torch.full((3,), 0.5))  # floor 1: 2e-5 > 1e-5
    assert max_scaled_diff(torch.tensor([1e-3 + 1e-8]), torch.tensor([1e-3]), floor=0) == pytest.approx(1e-5, rel=0.02)
    with pytest.raises(AssertionError):
        assert_close_f32(torch.tensor([math.nan]), torch.tensor([0.0]))
    with pytest.raises(AssertionError, match="shape"):
        assert_close_f32(torch.zeros(2, 3), torch.zeros(3))
