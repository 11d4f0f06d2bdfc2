"""BiTAT's importance-aware weight binarizer: α·sign(W) per output channel, with α chosen to minimise the
importance-weighted error ‖(W − α·sign W) V diag(s)^½‖² (the Σ-optimal scale, methods.md §3.4), and optionally
that error as a regulariser on the latent weights.

The forward value is always scale[c]·(±1), so the layer stays a plain binary conv at inference (the export
audit packs it). Because α depends on V and s, the task loss trains them ("task-dependent"). A layer whose
weight and transform are all frozen (or that runs without autograd, e.g. evaluation) reuses a cached quantized
weight until one of the tensors it depends on changes, so frozen layers cost nothing extra.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from baselines.quantizers import channel_scale, sign
from bitat.statistics import statistic_mode, statistic_shape
from bitat.transform import ImportanceTransform

__all__ = ["QuantizerOptions", "ImportanceAwareSign", "weighted_error", "sigma_optimal_scale", "SCALES"]

SCALES = ("sigma", "mean")


@dataclass(frozen=True)
class QuantizerOptions:
    """The open choices of the binarizer (docs/bitat.md explains each).
    scale: 'sigma' (Σ-optimal α, V/s trained by the task loss) or 'mean' (XNOR/ReActNet mean|w|).
    reg_weight: λ of the weighted-error regulariser, added to the latent weight's gradient (0 = off).
    im2col_cap / depthwise / centered: how the input statistic is collected (bitat.statistics).
    orthogonal_map: parametrization of V; reading: 'A' (per-layer normalised s) or 'B' (block-wide)."""

    scale: str = "sigma"
    reg_weight: float = 0.0
    im2col_cap: int = 2048
    depthwise: str = "shared"
    centered: bool = False
    orthogonal_map: str = "cayley"
    reading: str = "A"

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; choose one of {', '.join(SCALES)}")
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0, got {self.reg_weight}")
        if self.scale == "mean" and self.reg_weight == 0:
            raise ValueError("scale='mean' without a regulariser does not use the transform: "
                             "use the plain ScaledSignWeight (bitat-no-transform) instead")


def _rows(w: torch.Tensor, mode: str) -> torch.Tensor:
    """The weight as (C_out, r, n), with the transform acting on the last dimension."""
    m = w.shape[0]
    if mode == "full":
        return w.reshape(m, 1, -1)
    if mode == "channel":
        return w.reshape(m, w.shape[1], -1).transpose(1, 2)
    return w.reshape(m, w.shape[1], -1)  # spatial modes: rows of k·k positions


def _from_rows(rows: torch.Tensor, shape: torch.Size, mode: str) -> torch.Tensor:
    if mode == "channel":
        rows = rows.transpose(1, 2)
    return rows.reshape(shape)


def sigma_optimal_scale(w_rows: torch.Tensor, b_rows: torch.Tensor, v: torch.Tensor,
                        s: torch.Tensor) -> torch.Tensor:
    """α_r = w_rᵀ Σ b_r / b_rᵀ Σ b_r with Σ = V diag(s) Vᵀ, for rows (m, r, n), V (1 or m, n, n), s (1 or m, n)."""
    p, q = w_rows @ v, b_rows @ v
    s = s.unsqueeze(1)
    return (s * p * q).sum(dim=(1, 2)) / (s * q * q).sum(dim=(1, 2))


def weighted_error(w_rows: torch.Tensor, wb_rows: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """‖(W − W_b) V diag(s)^½‖²_F summed over rows: the expected output error under Σ = V diag(s) Vᵀ."""
    d = (w_rows - wb_rows) @ v
    return (s.unsqueeze(1) * d * d).sum()


class _ScaledSign(torch.autograd.Function):
    """α[c]·sign(W) forward. Backward: the clamp STE 1{|W| ≤ 1} to W (ReActNet's weight estimator) plus, when
    λ > 0, λ·∂‖(W − W_b)V diag(s)^½‖²/∂W = 2λ (W − W_b) Σ; the exact Σ_j g·b to α (so V and s get gradients)."""

    @staticmethod
    def forward(ctx, w, alpha, sigma, reg_weight, mode):
        b = sign(w)
        out = alpha.view(-1, *([1] * (w.dim() - 1))) * b
        ctx.save_for_backward(w, b, out, sigma)
        ctx.reg_weight, ctx.mode = reg_weight, mode
        return out

    @staticmethod
    def backward(ctx, grad):
        w, b, out, sigma = ctx.saved_tensors
        grad_w = torch.where(w.abs() <= 1, grad, 0.0)
        if ctx.reg_weight > 0:
            delta = _rows(w - out, ctx.mode) @ sigma
            grad_w = grad_w + (2.0 * ctx.reg_weight) * _from_rows(delta, w.shape, ctx.mode)
        grad_alpha = (grad * b).flatten(1).sum(dim=1)
        return grad_w, grad_alpha, None, None, None


class ImportanceAwareSign(nn.Module):
    """Weight quantizer of one binary conv: α·sign(W) with the importance-aware α (see module docstring).
    Its transform (`bitat_transform`: V, s) is sized from the conv's geometry at construction, so checkpoints
    load into a fresh model; `bitat.schedule` initialises it from PCA at the layer's stage."""

    scaled = True

    def __init__(self, conv: nn.Conv2d, options: QuantizerOptions = QuantizerOptions()) -> None:
        super().__init__()
        self.options = options
        self.mode = statistic_mode(conv, options.im2col_cap, options.depthwise)
        batch, n = statistic_shape(conv, self.mode)
        self.bitat_transform = ImportanceTransform(n, batch, options.orthogonal_map, options.reading)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        frozen = not (w.requires_grad or any(p.requires_grad for p in self._transform_tensors()))
        if frozen or not torch.is_grad_enabled():  # no graph needed: reuse while no tensor it depends on changed
            key = self._cache_key(w)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
            with torch.no_grad():
                out = self._quantize(w)
            self._cache = (key, out)
            return out
        self._cache = None
        return self._quantize(w)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        with torch.autocast(w.device.type, enabled=False):
            w32 = w.float()
            alpha = self._alpha(w32)
            sigma = None
            if self.options.reg_weight > 0 and w.requires_grad:
                sigma = self.bitat_transform.sigma().detach()
            out = _ScaledSign.apply(w32, alpha, sigma, self.options.reg_weight if sigma is not None else 0.0,
                                    self.mode)
        return out.to(w.dtype)

    def _alpha(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach()
        if self.options.scale == "mean":
            return channel_scale(w).flatten()
        t = self.bitat_transform
        return sigma_optimal_scale(_rows(w, self.mode), _rows(sign(w), self.mode), t.basis_matrix(), t.importance())

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """The per-output-channel α of the forward weight, shape (C_out,)."""
        with torch.no_grad():
            return self._alpha(w.float()).to(w.dtype)

    def weighted_error(self, w: torch.Tensor) -> torch.Tensor:
        """‖(W − W_b) V diag(s)^½‖² of this layer's current binarization (a differentiable diagnostic)."""
        t = self.bitat_transform
        wb = self._alpha(w.float()).view(-1, *([1] * (w.dim() - 1))) * sign(w.float())
        return weighted_error(_rows(w.float(), self.mode), _rows(wb, self.mode), t.basis_matrix(), t.importance())

    def _transform_tensors(self) -> list[torch.Tensor]:
        """Every tensor α depends on besides W: V's parameters and buffers, and s with its Reading-B peers."""
        t = self.bitat_transform
        peers = [p.importance_raw for p in t._peers if p is not t] if t.reading == "B" else []
        return [*t.parameters(), *t.buffers(), *peers]

    def _cache_key(self, w: torch.Tensor) -> tuple:
        return tuple((x.data_ptr(), x._version, x.dtype, x.device) for x in (w, *self._transform_tensors()))

    def extra_repr(self) -> str:
        o = self.options
        return f"mode={self.mode!r}, scale={o.scale!r}, reg_weight={o.reg_weight}, reading={o.reading!r}"
