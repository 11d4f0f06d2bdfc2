"""BinaryConv2d, XNOR's K, RSign, RPReLU, LearnableBias and binary_layers, against direct computations."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.layers import (BinaryConv2d, LearnableBias, RPReLU, RSign, XnorActivationScale, binary_layers,
                              set_binarize_inputs, set_binarize_weights)
from baselines.quantizers import ApproxSign, ScaledSignWeight, SteSign


def pm1(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def test_learnable_bias_starts_at_zero_and_shifts_per_channel():
    lb = LearnableBias(3)
    assert lb.bias.shape == (1, 3, 1, 1) and torch.count_nonzero(lb.bias) == 0
    with torch.no_grad():
        lb.bias.copy_(torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(lb(x), x + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1))


def test_rsign_is_sign_of_shifted_input_with_approxsign_gradient():
    torch.manual_seed(0)
    rs = RSign(4)
    b = torch.randn(4)
    with torch.no_grad():
        rs.shift.bias.copy_(b.view(1, 4, 1, 1))
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    y = rs(x)
    shifted = x.detach() + b.view(1, 4, 1, 1)
    assert torch.equal(y, pm1(shifted))
    g = torch.randn_like(y)
    y.backward(g)
    dx = g * torch.clamp(2 - 2 * shifted.abs(), min=0)
    torch.testing.assert_close(x.grad, dx)
    torch.testing.assert_close(rs.shift.bias.grad, dx.sum(dim=(0, 2, 3), keepdim=True))


def test_rprelu_piecewise_form():
    torch.manual_seed(1)
    c = 3
    act = RPReLU(c)
    assert torch.allclose(act.prelu.weight, torch.full((c,), 0.25))
    gamma, zeta, beta = torch.randn(c), torch.randn(c), torch.rand(c)
    with torch.no_grad():
        act.shift_in.bias.copy_(-gamma.view(1, c, 1, 1))
        act.shift_out.bias.copy_(zeta.view(1, c, 1, 1))
        act.prelu.weight.copy_(beta)
    x = torch.randn(2, c, 6, 6) * 2
    gm, zm, bm = (t.view(1, c, 1, 1) for t in (gamma, zeta, beta))
    expected = torch.where(x > gm, x - gm + zm, bm * (x - gm) + zm)
    torch.testing.assert_close(act(x), expected)


def direct_k(x: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
    """XNOR's K by loops: mean over channels of |x|, then the k x k window average (zeros outside)."""
    n, c, h, w = x.shape
    a = F.pad(x.abs().mean(dim=1), (padding, padding, padding, padding))
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    out = torch.zeros(n, 1, ho, wo, dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            win = a[:, i * stride:i * stride + k, j * stride:j * stride + k]
            out[:, 0, i, j] = win.sum(dim=(1, 2)) / (k * k)
    return out


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (5, 2, 2)])
def test_xnor_k_matches_direct_computation(k, stride, padding):
    torch.manual_seed(2)
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    ka = XnorActivationScale((k, k), (stride, stride), (padding, padding), (1, 1))
    torch.testing.assert_close(ka(x), direct_k(x, k, stride, padding))


def test_binary_conv_with_k_matches_paper_formula():
    torch.manual_seed(3)
    conv = BinaryConv2d(4, 6, 3, stride=2, padding=1, input_quantizer=SteSign(),
                        weight_quantizer=ScaledSignWeight("xnor_exact"), activation_scale=True).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    alpha = conv.weight.abs().mean(dim=(1, 2, 3)).view(1, 6, 1, 1)
    expected = F.conv2d(pm1(x), pm1(conv.weight), stride=2, padding=1) * alpha * direct_k(x, 3, 2, 1)
    torch.testing.assert_close(conv(x), expected)
    conv.activation_scale = None  # the released-code variant: no K
    torch.testing.assert_close(conv(x), F.conv2d(pm1(x), pm1(conv.weight), stride=2, padding=1) * alpha)


def test_grouped_k_is_per_group():
    torch.manual_seed(4)
    conv = BinaryConv2d(4, 4, 3, padding=1, groups=4, input_quantizer=SteSign(),
                        weight_quantizer=ScaledSignWeight(), activation_scale=True).double()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    plain = F.conv2d(pm1(x), conv.quantized_weight(), padding=1, groups=4)
    k = torch.cat([direct_k(x[:, i:i + 1], 3, 1, 1) for i in range(4)], dim=1)
    torch.testing.assert_close(conv(x), plain * k)


def test_binary_conv_forward_uses_zero_padding_and_quantized_weight():
    torch.manual_seed(5)
    conv = BinaryConv2d(3, 5, 3, padding=1, input_quantizer=ApproxSign(), weight_quantizer=ScaledSignWeight())
    assert isinstance(conv, nn.Conv2d)
    x = torch.randn(2, 3, 6, 6)
    wq = conv.quantized_weight()
    alpha = conv.weight_scale()
    torch.testing.assert_close(alpha, conv.weight.detach().abs().mean(dim=(1, 2, 3)))
    assert torch.equal(wq, alpha.view(-1, 1, 1, 1) * pm1(conv.weight))
    padded = F.pad(pm1(x), (1, 1, 1, 1), value=0.0)
    torch.testing.assert_close(conv(x), F.conv2d(padded, wq))
    # with ±1 at the borders instead, the border outputs would differ
    assert not torch.allclose(conv(x), F.conv2d(F.pad(pm1(x), (1, 1, 1, 1), value=1.0), wq))


def test_binarize_flags_switch_each_half():
    torch.manual_seed(6)
    conv = BinaryConv2d(3, 4, 3, padding=1, input_quantizer=SteSign(), weight_quantizer=ScaledSignWeight())
    assert conv.binarize_inputs and conv.binarize_weights
    x = torch.randn(1, 3, 5, 5)
    conv.binarize_weights = False
    assert conv.quantized_weight() is conv.weight
    torch.testing.assert_close(conv(x), F.conv2d(pm1(x), conv.weight, padding=1))
    conv.binarize_inputs = False
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, padding=1))
    plain = BinaryConv2d(3, 4, 3, padding=1)
    assert not plain.binarize_inputs and not plain.binarize_weights
    plain.binarize_weights = True
    with pytest.raises(ValueError, match="weight_quantizer"):
        plain(x)


def test_gradients_reach_latent_weights_and_inputs():
    conv = BinaryConv2d(3, 4, 3, padding=1, input_quantizer=RSign(3), weight_quantizer=ScaledSignWeight())
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    conv(x).square().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert conv.input_quantizer.shift.bias.grad is not None


def test_binary_layers_lists_in_registration_order_and_toggles():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        BinaryConv2d(4, 4, 3, input_quantizer=SteSign(), weight_quantizer=ScaledSignWeight()),
        nn.Sequential(nn.ReLU(), BinaryConv2d(4, 4, 1, input_quantizer=SteSign(), weight_quantizer=ScaledSignWeight())),
        BinaryConv2d(4, 4, 1, input_quantizer=SteSign()),
    )
    names = [n for n, _ in binary_layers(model)]
    assert names == ["1", "2.1", "3"]
    set_binarize_weights(model, False)
    assert [m.binarize_weights for _, m in binary_layers(model)] == [False, False, False]
    set_binarize_weights(model, True)
    assert [m.binarize_weights for _, m in binary_layers(model)] == [True, True, False]  # "3" has no quantizer
    set_binarize_inputs(model, False)
    assert not any(m.binarize_inputs for _, m in binary_layers(model))
