"""Issue 12's last methods: smooth_add (add_difference) and cosine_a / cosine_b (weighted_sum, with a
statistics pass over the sources): formulas on hand-computed tensors, scipy as reference, file merge == live
merge, the CLI."""
import pytest
import torch
from scipy import ndimage

from test_methods import T, run


# -- smooth_add -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3, 3)])
def test_smooth_add_matches_scipy_called_directly(shape):
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(shape, generator=g) for _ in range(3))
    d = (b - c).numpy()
    ref = ndimage.gaussian_filter(ndimage.median_filter(d, size=3, mode="reflect"), sigma=1.0, mode="reflect",
                                  truncate=4.0)
    got = run("add_difference", "smooth_add", a, b, c, alpha=0.3)
    assert torch.allclose(got, a + 0.3 * torch.from_numpy(ref), atol=1e-6, rtol=0)
    assert not torch.allclose(got, a + 0.3 * (b - c), atol=1e-3)  # the filters did change B - C


def test_smooth_add_by_hand_constant_difference_and_spike():
    a = torch.zeros(5, 5)
    # a constant difference survives both filters; a single spike is removed by the median
    b, c = torch.full((5, 5), 2.0), torch.zeros(5, 5)
    assert torch.allclose(run("add_difference", "smooth_add", a, b, c, alpha=0.5), torch.ones(5, 5), atol=1e-6)
    spike = torch.zeros(5, 5)
    spike[2, 2] = 100.0
    assert torch.equal(run("add_difference", "smooth_add", a, spike, torch.zeros(5, 5), alpha=1.0), a)


def test_smooth_add_alpha_zero_is_a_and_scalars_pass_through():
    a, b, c = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(run("add_difference", "smooth_add", a, b, c, alpha=0.0), a)
    assert torch.equal(run("add_difference", "smooth_add", T(2.0), T(3.0), T(1.0), alpha=0.5), T(3.0))
    assert torch.equal(run("add_difference", "smooth_add", T([2.0]), T([3.0]), T([1.0]), alpha=0.5), T([3.0]))
    got = run("add_difference", "smooth_add", a, b, c, alpha=0.7)
    assert not torch.isnan(got).any()
