"""Sign binarizers with their gradient estimators, and larq-style quantizer modules built on them.

Every sign here maps x >= 0 to +1 and x < 0 to -1 (the suite's convention, methods.md §1.3), so outputs
are exactly ±1 (or ±alpha). Each estimator is one autograd Function: one elementwise op forward, one backward.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "sign", "ste_sign", "approx_sign", "magnitude_aware_sign", "channel_scale",
    "SteSign", "ApproxSign", "SignWeight", "ScaledSignWeight", "WEIGHT_GRADS",
]


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1: exactly ±1 in the dtype of x (no gradient)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def channel_scale(w: torch.Tensor) -> torch.Tensor:
    """XNOR's alpha: mean |w| per output channel (dim 0) = ||W_c||_1 / n, shaped to broadcast over w."""
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)


class _SteSign(torch.autograd.Function):
    """sign forward; straight-through estimator clipped to |x| <= 1 backward (BNN, XNOR)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.where(x.abs() <= 1, grad, 0.0)


class _ApproxSign(torch.autograd.Function):
    """sign forward; Bi-Real's piecewise-polynomial derivative max(0, 2 - 2|x|) backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * (2.0 - 2.0 * x.abs()).clamp_(min=0.0)


class _MagnitudeAwareSign(torch.autograd.Function):
    """alpha * sign(w) with alpha = mean|w| per output channel; backward alpha * 1{|w| <= 1} (alpha constant)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        alpha = channel_scale(w)
        ctx.save_for_backward(w, alpha)
        return sign(w) * alpha

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        w, alpha = ctx.saved_tensors
        return torch.where(w.abs() <= 1, grad * alpha, 0.0)


class _ClampScaledSign(torch.autograd.Function):
    """alpha * sign(w) with alpha detached; gradient of clamp(w, -1, 1): 1{|w| <= 1} (ReActNet, Bi-Real PyTorch)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return sign(w) * channel_scale(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return torch.where(w.abs() <= 1, grad, 0.0)


def ste_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) (sign(0) = +1) with the clipped straight-through gradient 1{|x| <= 1}."""
    return _SteSign.apply(x)


def approx_sign(x: torch.Tensor) -> torch.Tensor:
    """sign(x) (sign(0) = +1) with Bi-Real's ApproxSign gradient max(0, 2 - 2|x|)."""
    return _ApproxSign.apply(x)


def magnitude_aware_sign(w: torch.Tensor) -> torch.Tensor:
    """Bi-Real paper's weight binarizer: alpha * sign(w), gradient alpha * 1{|w| <= 1} with alpha held constant."""
    return _MagnitudeAwareSign.apply(w)


class SteSign(nn.Module):
    """Activation quantizer: sign with the clipped STE (BNN / XNOR-Net)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ste_sign(x)


class ApproxSign(nn.Module):
    """Activation quantizer: sign with Bi-Real's ApproxSign gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return approx_sign(x)


class SignWeight(nn.Module):
    """Weight quantizer: plain sign(w) (no scale) with the clipped STE (BNN)."""

    scaled = False

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return ste_sign(w)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The per-output-channel scale of the forward weight (ones: no scale)."""
        return torch.ones(w.shape[0], dtype=w.dtype, device=w.device)


WEIGHT_GRADS = ("clamp", "magnitude_aware", "xnor_exact")


class ScaledSignWeight(nn.Module):
    """Weight quantizer: alpha * sign(w), alpha = mean|w| per output channel (XNOR's ||W||_1 / n).

    `grad` picks the estimator for the same forward value:
    'clamp' (alpha detached, gradient 1{|w| <= 1}: ReActNet and Bi-Real's PyTorch code),
    'magnitude_aware' (alpha * 1{|w| <= 1}: Bi-Real paper, larq MagnitudeAwareSign),
    'xnor_exact' (the exact chain rule through alpha: alpha * 1{|w| <= 1} * g + sign(w)/n * sum_j sign(w_j) g_j).
    """

    scaled = True

    def __init__(self, grad: str = "clamp") -> None:
        super().__init__()
        if grad not in WEIGHT_GRADS:
            raise ValueError(f"unknown weight gradient {grad!r}; choose one of {', '.join(WEIGHT_GRADS)}")
        self.grad = grad

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.grad == "clamp":
            return _ClampScaledSign.apply(w)
        if self.grad == "magnitude_aware":
            return magnitude_aware_sign(w)
        return channel_scale(w) * ste_sign(w)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The per-output-channel alpha of the forward weight, shape (C_out,)."""
        return channel_scale(w.detach()).flatten()

    def extra_repr(self) -> str:
        return f"grad={self.grad!r}"
