"""Sign binarizers with their gradient estimators, and larq-style quantizer modules built on them.

Every sign here maps x >= 0 to +1 and x < 0 to -1 (the suite's convention, methods.md §1.3), so outputs
are exactly ±1 (or ±alpha). Each estimator is one autograd Function built from vectorised in-place passes
(no `torch.where` on a boolean mask: on the CPU it is some 20x slower than a ReLU). Weight quantizers cache
their output while no gradient can flow (eval, frozen layers).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "sign", "ste_sign", "approx_sign", "magnitude_aware_sign", "channel_scale", "ste_grad", "approx_sign_grad",
    "SteSign", "ApproxSign", "SignWeight", "ScaledSignWeight", "WEIGHT_GRADS",
]


def sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1 (also for -0.0): exactly ±1 in the dtype of x (no gradient)."""
    out = torch.ge(x.detach(), 0, out=torch.empty_like(x, memory_format=torch.preserve_format))
    return out.mul_(2).sub_(1)


def channel_scale(w: torch.Tensor) -> torch.Tensor:
    """XNOR's alpha: mean |w| per output channel (dim 0) = ||W_c||_1 / n, shaped to broadcast over w."""
    return w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)


def ste_grad(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """grad * 1{|x| <= 1} in one pass: hardtanh's backward with bounds one ulp outside ±1 (it cuts strictly)."""
    bound = 1.0 + torch.finfo(x.dtype).eps  # the next representable value above 1 in x's dtype
    return torch.ops.aten.hardtanh_backward(grad, x, -bound, bound)


def approx_sign_grad(x: torch.Tensor, grad: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """grad * max(0, 2 - 2|x|) in four passes over one temporary (x itself with `inplace`); 2 + (-2)|x| rounds
    exactly as 2 - 2|x| (the product by 2 is exact)."""
    u = x.abs_() if inplace else x.abs()
    return torch.add(_TWO, u, alpha=-2.0, out=u).clamp_(min=0.0).mul_(grad)


_TWO = torch.tensor(2.0)  # a 0-dim CPU tensor: combines with any device and dtype as a plain scalar


class _Sign(torch.autograd.Function):
    """sign forward (sign(0) = +1), saving the input; subclasses give the backward estimator."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)


class _SteSign(_Sign):
    """sign forward; straight-through estimator clipped to |x| <= 1 backward (BNN, XNOR)."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return ste_grad(x, grad)


class _ApproxSign(_Sign):
    """sign forward; Bi-Real's piecewise-polynomial derivative max(0, 2 - 2|x|) backward."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return approx_sign_grad(x, grad)


class _MagnitudeAwareSign(torch.autograd.Function):
    """alpha * sign(w) with alpha = mean|w| per output channel; backward alpha * 1{|w| <= 1} (alpha constant)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        alpha = channel_scale(w)
        ctx.save_for_backward(w, alpha)
        return sign(w).mul_(alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        w, alpha = ctx.saved_tensors
        return ste_grad(w, grad * alpha)


class _ClampScaledSign(torch.autograd.Function):
    """alpha * sign(w) with alpha detached; gradient of clamp(w, -1, 1): 1{|w| <= 1} (ReActNet, Bi-Real PyTorch)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return sign(w).mul_(channel_scale(w))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return ste_grad(w, grad)


class _XnorExactSign(torch.autograd.Function):
    """alpha * sign(w) with the exact chain rule through alpha = mean|w| (XNOR-Net-PyTorch's weight gradient):
    alpha * 1{|w| <= 1} * g + sgn(w) / n * sum_j sign(w_j) g_j per output channel (sgn(0) = 0, as |w|' is)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        alpha = channel_scale(w)
        b = sign(w)
        ctx.save_for_backward(w, alpha, b)
        return b * alpha

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        w, alpha, b = ctx.saved_tensors
        dims = tuple(range(1, w.dim()))
        n = w[0].numel()
        through_alpha = (grad * b).sum(dim=dims, keepdim=True).div_(n)
        return ste_grad(w, grad * alpha).add_(torch.sgn(w).mul_(through_alpha))


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


class _FrozenCache(nn.Module):
    """A weight quantizer that reuses its last output while nothing can need its gradient (eval, frozen
    weights): the weight is then quantized once per change (keyed by its storage and in-place version counter),
    not once per forward. Subclasses implement `quantize(w)`."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and w.requires_grad:
            self._cache = None
            return self.quantize(w)
        key = (w.data_ptr(), w._version, w.shape, w.dtype, w.device)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.quantize(w))
        return self._cache[1]


class SignWeight(_FrozenCache):
    """Weight quantizer: plain sign(w) (no scale) with the clipped STE (BNN)."""

    scaled = False

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        return ste_sign(w)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The per-output-channel scale of the forward weight (ones: no scale)."""
        return torch.ones(w.shape[0], dtype=w.dtype, device=w.device)


WEIGHT_GRADS = ("clamp", "magnitude_aware", "xnor_exact")


class ScaledSignWeight(_FrozenCache):
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

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        if self.grad == "clamp":
            return _ClampScaledSign.apply(w)
        if self.grad == "magnitude_aware":
            return magnitude_aware_sign(w)
        return _XnorExactSign.apply(w)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The per-output-channel alpha of the forward weight, shape (C_out,)."""
        return channel_scale(w.detach()).flatten()

    def extra_repr(self) -> str:
        return f"grad={self.grad!r}"
