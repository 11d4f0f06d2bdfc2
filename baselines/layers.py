"""Binary layers: `BinaryConv2d` (input quantizer + weight quantizer + optional XNOR activation scale K),
ReActNet's `LearnableBias`, `RSign`, `RPReLU`, and `binary_layers(model)` that lists the binarized convolutions.

RSign and RPReLU keep ReActNet's parameter layout (so checkpoints match the official code's names) but run as
one autograd Function each: the same values and gradients as the composition of their parts, in fewer passes;
on the CPU in float32/float64 through the fused kernels of `baselines.fused` (one pass each way) when built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baselines import fused
from baselines.quantizers import approx_sign_grad

__all__ = ["LearnableBias", "RSign", "RPReLU", "XnorActivationScale", "BinaryConv2d", "binary_layers",
           "set_binarize_weights", "set_binarize_inputs", "tile_add"]


class LearnableBias(nn.Module):
    """x + b with a learnable per-channel shift b (init 0), stored as (1, C, 1, 1) like ReActNet's code."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias

    def extra_repr(self) -> str:
        return f"channels={self.bias.shape[1]}"


class _ShiftedApproxSign(torch.autograd.Function):
    """sign(x + b) (sign(0) = +1) with Bi-Real's ApproxSign gradient, as one Function: the forward compares
    x >= -b (the same decision as x + b >= 0 for finite values, without materialising x + b); backward
    recomputes x + b once and reduces the bias gradient over its broadcast dimensions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, bias)
        ctx.kernels = fused.ops() if fused.fits(x, bias) else None
        if ctx.kernels is not None:
            return ctx.kernels.rsign_forward(x, bias)
        out = torch.empty_like(x, dtype=torch.result_type(x, bias))
        return torch.ge(x, bias.neg(), out=out).mul_(2).sub_(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, bias = ctx.saved_tensors
        if ctx.kernels is not None:
            grad_in, grad_bias = ctx.kernels.rsign_backward(grad, x, bias)
            return grad_in, grad_bias.view(bias.shape)
        grad_in = approx_sign_grad(x + bias, grad, inplace=True)
        return grad_in, grad_in.sum_to_size(bias.shape)


def tile_add(x: torch.Tensor, residual: torch.Tensor, tiles: int = 1) -> torch.Tensor:
    """x + residual repeated `tiles` times along channels (dim 1), by broadcasting instead of materialising the
    repeat: a shortcut to a multiple of its input's channels (`TileChannels`, ReActNet-A's duplication)."""
    if tiles == 1:
        return x + residual
    return (x.unflatten(1, (tiles, residual.shape[1])) + residual.unsqueeze(1)).flatten(1, 2)


class _RPReLU(torch.autograd.Function):
    """PReLU(x + b_in; slope) + b_out with per-channel b_in, slope, b_out, as one Function; with a `residual`,
    of x + tile_add's residual first (the block's shortcut sum, which then never exists as a tensor of its own).
    Forward: the sum, one add, PReLU's kernel, an in-place add. Backward: the same values as autograd through
    the modules (the slope's gradient is sum(g * t) over t <= 0, t = x + b_in), from ReLU's backward kernel
    instead of PReLU's, an order of magnitude slower on the CPU. The fused kernels save x (and the residual,
    which the next unit's RSign keeps anyway) instead of t, and recompute t."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias_in: torch.Tensor, slope: torch.Tensor, bias_out: torch.Tensor,
                residual: torch.Tensor | None = None, tiles: int = 1) -> torch.Tensor:
        ctx.slope_shape, ctx.bias_in_shape, ctx.bias_out_shape = slope.shape, bias_in.shape, bias_out.shape
        ctx.tiles, ctx.has_residual = tiles, residual is not None
        per_channel = slope.view(1, -1, *([1] * (x.dim() - 2)))
        fits = fused.fits(x, bias_in, per_channel, bias_out) and (
            residual is None or fused.fits_tiled(x, residual, tiles))
        ctx.kernels = fused.ops() if fits else None
        if ctx.kernels is not None:
            ctx.save_for_backward(x, bias_in, slope, residual)
            return ctx.kernels.rprelu_forward(x, bias_in, slope, bias_out, residual, tiles)
        t = (x if residual is None else tile_add(x, residual, tiles)) + bias_in
        slope_b = slope.view(1, -1, *([1] * (t.dim() - 2)))
        ctx.save_for_backward(t, slope_b)
        out = torch._prelu_kernel(t, slope_b)
        if torch.result_type(out, bias_out) == out.dtype:
            return out.add_(bias_out)
        return out + bias_out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.kernels is not None:
            grad_x, grad_in, grad_slope, grad_out, grad_res = ctx.kernels.rprelu_backward(
                grad, *ctx.saved_tensors, ctx.tiles)
        else:
            t, slope_b = ctx.saved_tensors
            positive = torch.ops.aten.threshold_backward(grad, t, 0)  # grad where t > 0, else 0
            negative = grad - positive  # grad where t <= 0, else 0
            grad_x = positive.addcmul_(slope_b, negative)  # exact: one of the two terms is always zero
            grad_slope = negative.mul_(t).sum_to_size(slope_b.shape)
            grad_in, grad_out = grad_x.sum_to_size(ctx.bias_in_shape), grad.sum_to_size(ctx.bias_out_shape)
            grad_res = grad_x.unflatten(1, (ctx.tiles, -1)).sum(1) if ctx.has_residual and ctx.tiles > 1 else None
        if ctx.has_residual and ctx.tiles == 1:
            grad_res = grad_x
        return (grad_x, grad_in.view(ctx.bias_in_shape), grad_slope.view(ctx.slope_shape),
                grad_out.view(ctx.bias_out_shape), grad_res, None)


class RSign(nn.Module):
    """ReActNet's activation quantizer: sign(x + b) with a learnable per-channel threshold (-b), ApproxSign gradient."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift = LearnableBias(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ShiftedApproxSign.apply(x, self.shift.bias)


class RPReLU(nn.Module):
    """ReActNet's RPReLU: shift by -gamma, PReLU(C) (slope init 0.25), shift by +zeta; all per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift_in = LearnableBias(channels)
        self.prelu = nn.PReLU(channels, init=0.25)
        self.shift_out = LearnableBias(channels)

    adds_residual = True  # forward(x, residual, tiles): RPReLU of a block's shortcut sum, in one pass

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, tiles: int = 1) -> torch.Tensor:
        """RPReLU(x), or RPReLU(tile_add(x, residual, tiles)) without materialising the sum."""
        return _RPReLU.apply(x, self.shift_in.bias, self.prelu.weight, self.shift_out.bias, residual, tiles)


class XnorActivationScale(nn.Module):
    """XNOR-Net's K: the channel mean of |I| box-filtered with the conv's kernel size, stride, padding and
    dilation, so K has the conv output's spatial size. Per group for grouped convs (the channel mean is taken
    over each group's input channels). K is treated as a constant in backward, like alpha."""

    def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], groups: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """K for input x: shape (N, groups, H_out, W_out)."""
        n, c, h, w = x.shape
        a = x.detach().abs().view(n, self.groups, c // self.groups, h, w).mean(dim=2)
        kh, kw = self.kernel_size
        box = a.new_full((self.groups, 1, kh, kw), 1.0 / (kh * kw))
        return F.conv2d(a, box, None, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, groups={self.groups}"


class BinaryConv2d(nn.Conv2d):
    """A Conv2d whose input and weight pass through quantizer modules (larq's QuantConv2D).

    `binarize_inputs` / `binarize_weights` switch each half on or off (ReActNet step 1 trains binary
    activations with real weights); they start on when the matching quantizer is given. `quantized_weight()`
    is exactly the weight the forward uses. With `activation_scale=True` the output is multiplied by XNOR's K
    (computed from the real input) while inputs are binarized. Padding feeds zeros, as the official code does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, *,
                 input_quantizer: nn.Module | None = None, weight_quantizer: nn.Module | None = None,
                 activation_scale: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if isinstance(self.padding, str):
            raise ValueError("BinaryConv2d needs explicit integer padding, not a padding string")
        self.input_quantizer = input_quantizer
        self.weight_quantizer = weight_quantizer
        self.binarize_inputs = input_quantizer is not None
        self.binarize_weights = weight_quantizer is not None
        self.activation_scale = (XnorActivationScale(self.kernel_size, self.stride, self.padding, self.dilation,
                                                     groups) if activation_scale else None)

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward pass uses: quantizer(weight) when binarizing weights, else the real weight."""
        if not self.binarize_weights:
            return self.weight
        if self.weight_quantizer is None:
            raise ValueError("BinaryConv2d.binarize_weights is on but the layer has no weight_quantizer")
        return self.weight_quantizer(self.weight)

    def weight_scale(self) -> torch.Tensor:
        """Per-output-channel scale of `quantized_weight()` (shape (C_out,)): it equals scale[c] * (±1)."""
        if not self.binarize_weights:
            raise ValueError("weight_scale() is only defined while binarize_weights is on")
        scale = getattr(self.weight_quantizer, "scale", None)
        if scale is not None:
            return scale(self.weight)
        return self.quantized_weight().detach().abs().flatten(1).amax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = None
        if self.binarize_inputs:
            if self.input_quantizer is None:
                raise ValueError("BinaryConv2d.binarize_inputs is on but the layer has no input_quantizer")
            if self.activation_scale is not None:
                k = self.activation_scale(x)
            x = self.input_quantizer(x)
        out = self._conv_forward(x, self.quantized_weight(), self.bias)
        if k is not None:
            n, c, h, w = out.shape
            g = k.shape[1]
            out = (out.view(n, g, c // g, h, w) * k.unsqueeze(2)).view(n, c, h, w)
        return out

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", binarize_inputs={self.binarize_inputs}, "
                f"binarize_weights={self.binarize_weights}")


def binary_layers(model: nn.Module) -> list[tuple[str, BinaryConv2d]]:
    """Every BinaryConv2d of `model` with its qualified name, in module registration (= forward) order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BinaryConv2d)]


def set_binarize_weights(model: nn.Module, on: bool) -> None:
    """Switch weight binarization on or off in every BinaryConv2d of `model` that has a weight quantizer
    (ReActNet's two steps)."""
    for _, layer in binary_layers(model):
        layer.binarize_weights = on and layer.weight_quantizer is not None


def set_binarize_inputs(model: nn.Module, on: bool) -> None:
    """Switch input binarization on or off in every BinaryConv2d of `model` that has an input quantizer."""
    for _, layer in binary_layers(model):
        layer.binarize_inputs = on and layer.input_quantizer is not None
