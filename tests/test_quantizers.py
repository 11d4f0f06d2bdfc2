"""Sign binarizers: exact ±1 / ±alpha forward values and every estimator's gradient against its closed form."""
import pytest
import torch

from baselines.quantizers import (ApproxSign, ScaledSignWeight, SignWeight, SteSign, approx_sign, channel_scale,
                                  magnitude_aware_sign, sign, ste_sign)


def dense_grid() -> torch.Tensor:
    """-2 .. 2 in steps of 1e-3 (exactly hitting -1, 0 and 1) plus points just inside/outside |x| = 1."""
    grid = torch.arange(-2000, 2001, dtype=torch.float64) / 1000
    edges = torch.tensor([-1 - 1e-9, -1 + 1e-9, -1e-12, 1e-12, 1 - 1e-9, 1 + 1e-9], dtype=torch.float64)
    return torch.cat([grid, edges])


def grad_of(fn, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    fn(x).backward(upstream)
    return x.grad


def test_grid_hits_the_boundaries():
    x = dense_grid()
    for v in (-1.0, 0.0, 1.0):
        assert (x == v).any()


@pytest.mark.parametrize("fn", [sign, ste_sign, approx_sign])
def test_sign_forward_is_plus_minus_one_with_sign_zero_positive(fn):
    x = dense_grid()
    y = fn(x)
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(y, torch.where(x >= 0, 1.0, -1.0).double())
    assert fn(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    assert fn(torch.tensor([-0.0])).item() == 1.0
    assert y.dtype == x.dtype


def test_ste_sign_gradient_is_clipped_identity():
    x = dense_grid()
    g = torch.randn_like(x)
    expected = g * (x.abs() <= 1).double()
    assert torch.equal(grad_of(ste_sign, x, g), expected)
    # the boundary |x| = 1 passes the gradient, just outside it is cut
    ones = torch.tensor([-1.0, 1.0, -1.0 - 1e-6, 1.0 + 1e-6])
    assert grad_of(ste_sign, ones, torch.ones(4)).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_approx_sign_gradient_is_bireal_polynomial_derivative():
    x = dense_grid()
    g = torch.randn_like(x)
    expected = g * torch.clamp(2 - 2 * x.abs(), min=0)
    torch.testing.assert_close(grad_of(approx_sign, x, g), expected, rtol=0, atol=1e-12)
    pts = torch.tensor([0.0, 0.5, -0.5, 1.0, -1.0, 1.5])
    assert grad_of(approx_sign, pts, torch.ones(6)).tolist() == [2.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def weight_with_boundaries() -> torch.Tensor:
    """A (4, 3, 3, 3) weight whose first channel holds 0, ±1 and values just beyond ±1."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 0.8
    w[0, 0, 0, :] = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    w[0, 0, 1, :] = torch.tensor([1.0 + 1e-6, -1.0 - 1e-6, 2.5], dtype=torch.float64)
    return w


def alpha_of(w: torch.Tensor) -> torch.Tensor:
    return torch.stack([w[c].abs().sum() / w[c].numel() for c in range(w.shape[0])]).view(-1, 1, 1, 1)


@pytest.mark.parametrize("grad", ["clamp", "magnitude_aware", "xnor_exact"])
def test_scaled_sign_forward_is_plus_minus_alpha_per_channel(grad):
    w = weight_with_boundaries()
    q = ScaledSignWeight(grad)(w)
    alpha = alpha_of(w)
    torch.testing.assert_close(channel_scale(w), alpha)
    for c in range(w.shape[0]):
        vals = set(q[c].unique().tolist())
        assert vals <= {alpha[c].item(), -alpha[c].item()}
    assert torch.equal(q, torch.where(w >= 0, 1.0, -1.0).double() * channel_scale(w))
    assert q[0, 0, 0, 0].item() > 0  # sign(0) = +1
    torch.testing.assert_close(ScaledSignWeight(grad).scale(w), alpha.flatten())


def test_clamp_weight_gradient_has_no_alpha():
    w = weight_with_boundaries()
    g = torch.randn_like(w)
    expected = g * (w.abs() <= 1).double()
    assert torch.equal(grad_of(ScaledSignWeight("clamp"), w, g), expected)


def test_magnitude_aware_gradient_is_alpha_times_clipped_ste():
    w = weight_with_boundaries()
    g = torch.randn_like(w)
    expected = g * alpha_of(w) * (w.abs() <= 1).double()
    torch.testing.assert_close(grad_of(magnitude_aware_sign, w, g), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(grad_of(ScaledSignWeight("magnitude_aware"), w, g), expected, rtol=0, atol=1e-14)


def test_xnor_exact_gradient_is_full_chain_rule():
    w = weight_with_boundaries()
    w[0, 0, 0, 0] = 0.3  # d|w|/dw at exactly 0 is a subgradient; keep the closed form unambiguous
    g = torch.randn_like(w)
    n = w[0].numel()
    s = torch.where(w >= 0, 1.0, -1.0).double()
    expected = alpha_of(w) * (w.abs() <= 1).double() * g + s / n * (s * g).sum(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(grad_of(ScaledSignWeight("xnor_exact"), w, g), expected, rtol=0, atol=1e-12)


def test_sign_weight_is_unscaled_with_ste():
    w = weight_with_boundaries()
    q = SignWeight()(w)
    assert set(q.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(SignWeight().scale(w), torch.ones(4, dtype=w.dtype))
    g = torch.randn_like(w)
    assert torch.equal(grad_of(SignWeight(), w, g), g * (w.abs() <= 1).double())


def test_activation_modules_match_functions():
    x = dense_grid()
    g = torch.randn_like(x)
    assert torch.equal(grad_of(SteSign(), x, g), grad_of(ste_sign, x, g))
    assert torch.equal(grad_of(ApproxSign(), x, g), grad_of(approx_sign, x, g))


def test_unknown_weight_gradient_is_rejected():
    with pytest.raises(ValueError, match="clamp, magnitude_aware, xnor_exact"):
        ScaledSignWeight("bogus")


def test_float32_and_half_keep_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(10, dtype=dtype, requires_grad=True)
        y = ste_sign(x)
        assert y.dtype == dtype
        y.sum().backward()
        assert x.grad.dtype == dtype
