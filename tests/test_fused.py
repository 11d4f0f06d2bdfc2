"""baselines.fused: the fused RSign/RPReLU kernels against the eager code of the same autograd Functions
(per-element values bit for bit, per-channel reductions up to summation order), their dispatch and fallbacks."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from baselines import fused
from baselines.layers import RPReLU, RSign, _RPReLU, _ShiftedApproxSign

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernels():
    if os.environ.get("BITBENCH_FUSED") == "0":
        pytest.skip("BITBENCH_FUSED=0 in the environment")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not fused.available():
            pytest.skip(f"the fused extension cannot be built here: {caught[0].message if caught else '?'}")
    return fused.ops()


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so -0.0 != 0.0)."""
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(bits(a), bits(b))


def assert_sums_close(a: torch.Tensor, b: torch.Tensor, terms_abs: torch.Tensor) -> None:
    """a, b: per-channel sums in different orders; terms_abs: the per-channel sum of |terms| (error scale)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    tol = 64 * torch.finfo(a.dtype).eps * terms_abs.reshape(a.shape)
    assert ((a - b).abs() <= tol).all(), (a - b).abs().max()


def run(fn, env: str, monkeypatch, x: torch.Tensor, g: torch.Tensor, *params: torch.Tensor):
    """Output, grad_x and parameter gradients of fn.apply(x, *params) with BITBENCH_FUSED=env."""
    monkeypatch.setenv("BITBENCH_FUSED", env)
    x = x.detach().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    out = fn.apply(x, *params)
    assert (out.grad_fn.kernels is not None) == (env == "1")
    return (out.detach(), *torch.autograd.grad(out, [x, *params], g))


def awkward(shape: tuple[int, ...], dtype: torch.dtype, bias: torch.Tensor, seed: int) -> torch.Tensor:
    """Random values with, per channel, zeros, -0.0, exactly -b, -b +- 1 (|x + b| = 1), huge values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=dtype, generator=gen) * 2
    flat = x.movedim(1, -1).reshape(-1, shape[1])  # a copy: rows of (…, C)
    b = bias.reshape(-1)
    big = 1e30 if dtype == torch.float32 else 1e300
    for row, value in enumerate([0.0, -0.0, -b, 1 - b, -1 - b, big, -big]):
        if row < flat.shape[0]:
            flat[row] = value
    moved = flat.reshape(*shape[:1], *shape[2:], shape[1])
    return moved.movedim(-1, 1).contiguous()


SHAPES = [(3, 5, 4, 6), (7, 5), (2, 5, 9), (4, 5, 1, 1)]


def channel_params(shape, dtype, seed, n):
    gen = torch.Generator().manual_seed(seed)
    view = (1, shape[1], *([1] * (len(shape) - 2)))
    return [torch.randn(view, dtype=dtype, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_rsign_fused_equals_eager(kernels, monkeypatch, shape, dtype):
    (bias,) = channel_params(shape, dtype, 0, 1)
    x = awkward(shape, dtype, bias, 1)
    g = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
    g.view(-1)[:3] = torch.tensor([-1.0, 0.0, -0.0])
    out_f, gx_f, gb_f = run(_ShiftedApproxSign, "1", monkeypatch, x, g, bias)
    out_e, gx_e, gb_e = run(_ShiftedApproxSign, "0", monkeypatch, x, g, bias)
    assert_same_bits(out_f, out_e)
    assert_same_bits(gx_f, gx_e)
    assert_sums_close(gb_f, gb_e, gx_e.abs().sum_to_size(bias.shape))
    assert set(out_f.unique().tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_rprelu_fused_equals_eager(kernels, monkeypatch, shape, dtype):
    bias_in, bias_out = channel_params(shape, dtype, 3, 2)
    slope = torch.tensor([0.25, -0.5, 0.0, 1.0, 1.7], dtype=dtype)[: shape[1]]
    x = awkward(shape, dtype, bias_in, 4)
    g = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    g.view(-1)[:3] = torch.tensor([-1.0, 0.0, -0.0])
    out_f, gx_f, *grads_f = run(_RPReLU, "1", monkeypatch, x, g, bias_in, slope, bias_out)
    out_e, gx_e, *grads_e = run(_RPReLU, "0", monkeypatch, x, g, bias_in, slope, bias_out)
    assert_same_bits(out_f, out_e)
    assert_same_bits(gx_f, gx_e)
    t = x + bias_in
    terms = [gx_e.abs(), (g * t).abs().masked_fill(t > 0, 0), g.abs()]
    for a, b, term, p in zip(grads_f, grads_e, terms, (bias_in, slope, bias_out)):
        assert_sums_close(a, b, term.sum_to_size(*(1, shape[1]), *([1] * (len(shape) - 2))).view(p.shape))


@pytest.mark.parametrize("module", [RSign, RPReLU])
def test_non_contiguous_input_and_grad(kernels, monkeypatch, module):
    torch.manual_seed(6)
    layer = module(4)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    base = torch.randn(3, 5, 6, 4)  # (N, H, W, C) viewed as NCHW: channels-last strides
    x, g = base.permute(0, 3, 1, 2), torch.randn(3, 4, 5, 6).transpose(2, 3).contiguous().transpose(2, 3)
    assert not x.is_contiguous() and not g.is_contiguous()
    results = {}
    for env in ("1", "0"):
        monkeypatch.setenv("BITBENCH_FUSED", env)
        xr = x.detach().requires_grad_(True)
        out = layer(xr)
        assert (out.grad_fn.kernels is not None) == (env == "1")
        results[env] = (out.detach(), *torch.autograd.grad(out, [xr, *layer.parameters()], g))
    (out_f, gx_f, *p_f), (out_e, gx_e, *p_e) = results["1"], results["0"]
    assert_same_bits(out_f, out_e.contiguous())
    assert_same_bits(gx_f, gx_e.contiguous())
    for a, b in zip(p_f, p_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [RSign, RPReLU])
def test_gradcheck_through_the_fused_function(kernels, module):
    torch.manual_seed(7)
    layer = module(3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.3, 0.3)
    x = (torch.rand(2, 3, 4, 4, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    assert layer(x).grad_fn.kernels is not None
    if module is RSign:  # piecewise-constant forward: the gradient is ApproxSign's, i.e. the exact
        # derivative of the surrogate 2u - u|u| (u = x + b clamped to [-1, 1]), checked with gradcheck too
        b = layer.shift.bias
        g = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        fused_grads = torch.autograd.grad(_ShiftedApproxSign.apply(x, b), [x, b], g)

        def surrogate(x, b):
            u = (x + b).clamp(-1, 1)
            return 2 * u - u * u.abs()

        assert torch.autograd.gradcheck(surrogate, (x, b))
        for a, s in zip(fused_grads, torch.autograd.grad(surrogate(x, b), [x, b], g)):
            torch.testing.assert_close(a, s, rtol=1e-12, atol=1e-12)
    else:
        assert torch.autograd.gradcheck(lambda x, *p: _RPReLU.apply(x, *p), (x, *layer.parameters()))


def test_env_switch_forces_eager(kernels, monkeypatch):
    monkeypatch.setenv("BITBENCH_FUSED", "0")
    assert fused.ops() is None and not fused.available()
    out = RSign(2)(torch.randn(1, 2, 3, 3))
    assert out.grad_fn.kernels is None
    monkeypatch.setenv("BITBENCH_FUSED", "1")
    assert fused.available() and RSign(2)(torch.randn(1, 2, 3, 3)).grad_fn.kernels is not None


def test_unsupported_inputs_run_eagerly(kernels):
    assert RSign(2).bfloat16()(torch.randn(1, 2, 3, 3, dtype=torch.bfloat16)).grad_fn.kernels is None
    assert RSign(2)(torch.randn(1, 2, 3, 3, dtype=torch.float64)).grad_fn.kernels is None  # mixed dtypes
    # RPReLU's (1, C, 1, 1) biases broadcast a 2-D input to 4-D in eager PyTorch: kept as it is.
    act = RPReLU(3)
    out = act(torch.randn(3, 3))
    assert out.grad_fn.kernels is None and out.shape == (1, 3, 3, 3)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise RuntimeError("Error building extension 'bitbench_react_units'\ng++: not found\nmore lines")

    monkeypatch.setenv("BITBENCH_FUSED", "1")
    monkeypatch.setattr(fused, "_module", None)
    monkeypatch.setattr(fused, "_failed", False)
    monkeypatch.setattr(cpp, "load", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fused.ops() is None
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        RSign(3)(x).sum().backward()  # trains on, eagerly
        assert fused.ops() is None
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "Error building extension 'bitbench_react_units'" in message


@pytest.mark.slow
def test_concurrent_first_builds(tmp_path):
    """Two processes building into one fresh extension dir at once (torch's build lock): both get the kernels."""
    code = ("import warnings; warnings.simplefilter('error', RuntimeWarning)\n"
            "from baselines import fused; import sys; sys.exit(0 if fused.available() else 1)")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(REPO), "BITBENCH_FUSED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,tiles", [((3, 6, 4, 5), 1), ((3, 6, 4, 5), 3), ((2, 8, 7), 4), ((4, 6, 1, 1), 2)])
def test_rprelu_of_a_residual_sum_fused_equals_eager(kernels, monkeypatch, shape, tiles, dtype):
    """RPReLU(x + tile(r)) with the sum inside the kernel: out and grad_x bit for bit as eager; grad_r is grad_x
    (one tile) or its sum over the tiles in tile order, as eager's."""
    bias_in, bias_out = channel_params(shape, dtype, 8, 2)
    slope = torch.linspace(-0.5, 1.5, shape[1], dtype=dtype)
    x = awkward(shape, dtype, bias_in, 9)
    r = torch.randn(shape[0], shape[1] // tiles, *shape[2:], dtype=dtype, generator=torch.Generator().manual_seed(10))
    g = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(11))
    results = {}
    for env in ("1", "0"):
        monkeypatch.setenv("BITBENCH_FUSED", env)
        xs, rs = x.detach().requires_grad_(True), r.detach().requires_grad_(True)
        params = [p.detach().clone().requires_grad_(True) for p in (bias_in, slope, bias_out)]
        out = _RPReLU.apply(xs, *params, rs, tiles)
        assert (out.grad_fn.kernels is not None) == (env == "1")
        results[env] = (out.detach(), *torch.autograd.grad(out, [xs, rs, *params], g))
    (out_f, gx_f, gr_f, *p_f), (out_e, gx_e, gr_e, *p_e) = results["1"], results["0"]
    assert_same_bits(out_f, out_e)
    assert_same_bits(gx_f, gx_e)
    assert_same_bits(gr_f, gr_e)
    for a, b in zip(p_f, p_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_residual_rprelu_equals_rprelu_of_the_materialised_sum(kernels, monkeypatch):
    """Residual(body, TileChannels / identity, RPReLU) and DuplicatedResidual: same outputs and gradients as
    RPReLU applied to the explicit sum, fused or eager."""
    from baselines.archs.common import Residual, TileChannels
    from baselines.archs.mobilenet import DuplicatedResidual

    torch.manual_seed(12)
    for env in ("1", "0"):
        monkeypatch.setenv("BITBENCH_FUSED", env)
        for shortcut, cin, cout, stride in ((TileChannels(3, 2), 4, 12, 2), (torch.nn.Identity(), 6, 6, 1)):
            body, act = torch.nn.Conv2d(cin, cout, 3, stride, 1), RPReLU(cout)
            with torch.no_grad():
                for p in act.parameters():
                    p.normal_()
            x = torch.randn(2, cin, 8, 8, requires_grad=True)
            fused_out = Residual(body, shortcut, act)(x)
            plain = act(body(x) + shortcut(x))
            g = torch.randn_like(plain)
            torch.testing.assert_close(fused_out, plain, rtol=0, atol=0)
            for a, b in zip(torch.autograd.grad(fused_out, [x, body.weight, *act.parameters()], g),
                            torch.autograd.grad(plain, [x, body.weight, *act.parameters()], g)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        first, second, act = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 1), RPReLU(8)
        x = torch.randn(2, 4, 5, 5, requires_grad=True)
        out = DuplicatedResidual(first, second, act)(x)
        plain = act(torch.cat([first(x) + x, second(x) + x], dim=1))
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
        g = torch.randn_like(plain)
        wrt = [x, first.weight]
        for a, b in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(plain, wrt, g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_gradcheck_with_a_tiled_residual(kernels):
    torch.manual_seed(13)
    layer = RPReLU(6).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-0.3, 0.3)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert layer(x, r, 3).grad_fn.kernels is not None
    assert torch.autograd.gradcheck(lambda x, r, *p: _RPReLU.apply(x, *p, r, 3), (x, r, *layer.parameters()))


def test_results_do_not_depend_on_the_thread_count(kernels):
    """The kernels split planes over threads (built with OpenMP); every value and sum comes out bit for bit the
    same with one thread as with several."""
    gen = torch.Generator().manual_seed(14)
    x, g = torch.randn(64, 24, 9, 9, generator=gen), torch.randn(64, 24, 9, 9, generator=gen)  # ~4 parallel chunks
    r = torch.randn(64, 8, 9, 9, generator=gen)
    b, w, bo = (torch.randn(1, 24, 1, 1, generator=gen) for _ in range(3))
    calls = (lambda: kernels.rsign_forward(x, b), lambda: kernels.rsign_backward(g, x, b),
             lambda: kernels.rprelu_forward(x, b, w.view(-1), bo, r, 3),
             lambda: kernels.rprelu_backward(g, x, b, w.view(-1), r, 3),
             lambda: kernels.rprelu_backward(g, x, b, w.view(-1)))
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 4):
            torch.set_num_threads(threads)
            results.append([call() for call in calls])
    finally:
        torch.set_num_threads(before)
    for one, many in zip(*results):
        for a, b_ in zip(one if isinstance(one, list) else [one], many if isinstance(many, list) else [many]):
            if a is None:
                assert b_ is None
            else:
                assert_same_bits(a, b_)
