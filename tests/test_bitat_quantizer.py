"""BiTAT's importance-aware binarizer: the Σ-optimal scale beats mean|w| on correlated inputs (and equals it for
Σ = I), every statistic mode weights the right entries, the output is exactly scale·(±1), gradients reach W, V
and s, the regulariser's gradient is the weighted error's, and frozen layers reuse a cached weight."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.quantizers import channel_scale, sign
from bitat.quantizer import ImportanceAwareSign, QuantizerOptions
from bitat.statistics import CovarianceAccumulator, statistic_rows, statistic_shape


pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_inputs(n=256, c=4, size=8, seed=0) -> torch.Tensor:
    """Images whose channels are mixed and whose pixels are spatially smoothed: strongly correlated patches."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=gen) + 2.0 * torch.eye(c)
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(n, c, size, size, generator=gen))
    return F.avg_pool2d(x, 3, 1, 1) + 0.3


def calibrated(conv: nn.Conv2d, x: torch.Tensor, options: QuantizerOptions = QuantizerOptions()):
    q = ImportanceAwareSign(conv, options)
    batch, n = statistic_shape(conv, q.mode)
    acc = CovarianceAccumulator(n, batch)
    acc.update(statistic_rows(conv, x, q.mode))
    q.bitat_transform.init_from_covariance(acc.covariance(options.centered))
    return q


def output_error(conv: nn.Conv2d, x: torch.Tensor, w_b: torch.Tensor) -> float:
    """The mean squared output error of the binarized conv on x: E ||(W - W_b) * x||²."""
    diff = F.conv2d(x, conv.weight.detach() - w_b, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return diff.pow(2).sum(dim=1).mean().item()


def test_sigma_optimal_scale_has_smaller_expected_output_error_than_mean_abs():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    x = correlated_inputs()
    q = calibrated(conv, x)
    assert q.mode == "full"
    with torch.no_grad():
        ours = q(conv.weight)
        xnor = channel_scale(conv.weight) * sign(conv.weight)
    assert torch.equal(sign(ours), sign(xnor))  # same signs, only the per-channel scale differs
    e_ours, e_xnor = output_error(conv, x, ours), output_error(conv, x, xnor)
    assert e_ours < 0.98 * e_xnor, (e_ours, e_xnor)
    # per channel it is the minimiser: moving any α either way increases the error
    alpha = q.scale(conv.weight)
    for factor in (0.97, 1.03):
        assert output_error(conv, x, ours * factor) > e_ours
    assert alpha.shape == (8,) and bool((alpha > 0).all())
    # the analytic weighted error is the measured output error (uncentred Σ = E[x xᵀ]; Σ s = d rescales it)
    d = 4 * 9
    acc = CovarianceAccumulator(d)
    acc.update(statistic_rows(conv, x, "full"))
    trace = acc.covariance()[0].trace().item()
    assert q.weighted_error(conv.weight).item() * trace / d == pytest.approx(e_ours, rel=1e-3)


def test_identity_sigma_gives_mean_abs_scale():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    q = ImportanceAwareSign(conv)  # before calibration: V = I, s = 1, so Σ = I
    with torch.no_grad():
        torch.testing.assert_close(q(conv.weight), channel_scale(conv.weight) * sign(conv.weight))
        q.bitat_transform.init_from_covariance(torch.eye(36, dtype=torch.float64).unsqueeze(0) * 7.0)
        torch.testing.assert_close(q.scale(conv.weight), channel_scale(conv.weight).flatten())


def kron_sigma(q: ImportanceAwareSign, conv: nn.Conv2d) -> torch.Tensor:
    """The full (C_out, d, d) Σ each output row is weighted with, built explicitly from the mode's structure."""
    sigma = q.bitat_transform.sigma().detach().double()
    kk = conv.kernel_size[0] * conv.kernel_size[1]
    cg = conv.in_channels // conv.groups
    if q.mode == "full":
        full = sigma[0]
    elif q.mode == "channel":
        full = torch.kron(sigma[0], torch.eye(kk, dtype=torch.float64))
    elif q.mode == "spatial":
        full = torch.kron(torch.eye(cg, dtype=torch.float64), sigma[0])
    else:
        return sigma
    return full.expand(conv.out_channels, *full.shape)


@pytest.mark.parametrize("conv, options, mode", [
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), QuantizerOptions(), "full"),
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), QuantizerOptions(im2col_cap=8), "channel"),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), QuantizerOptions(), "spatial"),
    (nn.Conv2d(6, 6, 3, padding=1, groups=3, bias=False), QuantizerOptions(), "spatial"),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), QuantizerOptions(depthwise="per_channel"),
     "spatial_per_channel"),
])
def test_every_statistic_mode_gives_the_row_wise_sigma_optimal_scale(conv, options, mode):
    torch.manual_seed(0)
    x = correlated_inputs(n=64, c=conv.in_channels, seed=1)
    q = calibrated(conv, x, options)
    assert q.mode == mode
    w = conv.weight.detach().double().flatten(1)
    b = sign(w)
    full = kron_sigma(q, conv)
    expected = torch.einsum("ri,rij,rj->r", w, full, b) / torch.einsum("ri,rij,rj->r", b, full, b)
    torch.testing.assert_close(q.scale(conv.weight).double(), expected, rtol=1e-4, atol=1e-6)
    error = torch.einsum("ri,rij,rj->", w - expected[:, None] * b, full, w - expected[:, None] * b)
    torch.testing.assert_close(q.weighted_error(conv.weight).double(), error, rtol=1e-4, atol=1e-6)


def test_output_is_exactly_scale_times_sign_and_gradients_reach_w_v_and_s():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    q = calibrated(conv, correlated_inputs(n=32))
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 1.5  # outside the clamp window: no STE gradient there
    out = q(conv.weight)
    a = out.detach().abs().flatten(1)
    assert torch.equal(a, a[:, :1].expand_as(a)), "every |w_b| of a channel equal: α[c]·(±1)"
    assert torch.equal(sign(out.detach()), sign(conv.weight.detach()))
    g = torch.randn_like(out)
    (out * g).sum().backward()
    expected_w = torch.where(conv.weight.detach().abs() <= 1, g, 0.0)  # ReActNet's clamp STE
    torch.testing.assert_close(conv.weight.grad, expected_w)
    assert conv.weight.grad[0, 0, 0, 0] == 0
    t = q.bitat_transform
    assert t.importance_raw.grad.abs().sum() > 0
    assert t.basis.parametrizations.weight.original.grad.abs().sum() > 0


def test_regulariser_adds_the_weighted_error_gradient_to_the_latent_weight():
    torch.manual_seed(0)
    lam = 0.3
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    x = correlated_inputs(n=32)
    plain = calibrated(conv, x)
    reg = calibrated(conv, x, QuantizerOptions(reg_weight=lam))
    g = torch.randn(6, 4, 3, 3)
    grads = []
    for q in (plain, reg):
        conv.weight.grad = None
        (q(conv.weight) * g).sum().backward()
        grads.append(conv.weight.grad.clone())
    w = conv.weight.detach().clone().requires_grad_(True)
    w_b = reg(conv.weight).detach()
    d = (w - w_b).flatten(1)
    sigma = reg.bitat_transform.sigma().detach()[0]
    (lam * torch.einsum("ri,ij,rj->", d, sigma, d)).backward()
    torch.testing.assert_close(grads[1] - grads[0], w.grad, rtol=1e-4, atol=1e-6)
    assert w.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no-transform"):
        QuantizerOptions(scale="mean")
    mean_reg = ImportanceAwareSign(conv, QuantizerOptions(scale="mean", reg_weight=lam))
    torch.testing.assert_close(mean_reg(conv.weight).detach(),
                               channel_scale(conv.weight.detach()) * sign(conv.weight.detach()))


def test_frozen_layer_reuses_its_quantized_weight_until_its_state_changes():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    q = calibrated(conv, correlated_inputs(n=32))
    live = q(conv.weight)
    assert live.requires_grad
    with torch.no_grad():  # evaluation: no graph, so reuse while nothing changed, even for a training layer
        first = q(conv.weight)
        assert q(conv.weight) is first
        conv.weight.add_(0.01)  # an optimizer step changes the weight in place
        assert q(conv.weight) is not first
        conv.weight.sub_(0.01)
    assert q(conv.weight).requires_grad  # with autograd on, a training layer never returns the cache
    conv.weight.requires_grad_(False)
    q.bitat_transform.requires_grad_(False)
    first, second = q(conv.weight), q(conv.weight)
    assert first is second and not first.requires_grad
    torch.testing.assert_close(first, live.detach())
    state = {k: v.clone() for k, v in q.state_dict().items()}
    state["bitat_transform.importance_raw"][0, :3] += 2.0
    q.load_state_dict(state)  # e.g. a resumed checkpoint: the cache must not survive it
    third = q(conv.weight)
    assert third is not first and not torch.equal(third, first)
    with torch.no_grad():
        conv.weight.mul_(-1)
    assert torch.equal(sign(q(conv.weight)), -sign(first))


def test_forward_under_autocast_keeps_float32_scales():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    q = calibrated(conv, correlated_inputs(n=32))
    reference = q(conv.weight).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(conv.weight)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.detach(), reference)
