"""Input statistics of a binarized convolution: which vectors its weights multiply, their streaming second moment
(float64) and its PCA. They initialise BiTAT's correlation matrix V and importance vector s (methods.md §3.4).

A weight row w_r of a conv multiplies im2col patches x, so the expected output error of a binarized row is
(w_r - b_r)ᵀ Σ (w_r - b_r) with Σ = E[x xᵀ]. What "x" is depends on the layer's statistic mode:

- 'full':    the whole im2col patch (C_in·k·k values); exact, used when C_in·k·k <= the cap (1×1 convs: C_in).
- 'channel': one pixel's channel vector (C_in values): Σ ≈ Σ_c ⊗ I_{k·k}, the reduction for wide k×k convs.
- 'spatial': one channel's k×k patch (k·k values), pooled over channels: Σ ≈ I_{C_in/groups} ⊗ Σ_p, one
             matrix shared by every output channel (depthwise/grouped convs).
- 'spatial_per_channel': a k×k covariance per channel of a depthwise conv (C batched k·k × k·k matrices).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["STATISTIC_MODES", "statistic_mode", "statistic_shape", "statistic_rows", "CovarianceAccumulator",
           "pca"]

STATISTIC_MODES = ("full", "channel", "spatial", "spatial_per_channel")


def statistic_mode(conv: nn.Conv2d, im2col_cap: int = 2048, depthwise: str = "shared") -> str:
    """The statistic a conv gets: 'full' when groups == 1 and C_in·k·k <= im2col_cap, else 'channel';
    grouped convs get 'spatial' (depthwise='shared') or, when depthwise, 'spatial_per_channel' ('per_channel')."""
    if depthwise not in ("shared", "per_channel"):
        raise ValueError(f"unknown depthwise statistic {depthwise!r}; choose 'shared' or 'per_channel'")
    if im2col_cap < 1:
        raise ValueError(f"im2col_cap must be a positive number of patch values, got {im2col_cap}")
    kk = conv.kernel_size[0] * conv.kernel_size[1]
    if conv.groups == 1:
        return "full" if conv.in_channels * kk <= im2col_cap or kk == 1 else "channel"
    is_depthwise = conv.groups == conv.in_channels == conv.out_channels
    return "spatial_per_channel" if depthwise == "per_channel" and is_depthwise else "spatial"


def statistic_shape(conv: nn.Conv2d, mode: str) -> tuple[int, int]:
    """(batch, n): the statistic is `batch` matrices of size n × n (batch 1 except 'spatial_per_channel')."""
    kk = conv.kernel_size[0] * conv.kernel_size[1]
    if mode == "full":
        return 1, conv.in_channels // conv.groups * kk
    if mode == "channel":
        return 1, conv.in_channels
    if mode == "spatial":
        return 1, kk
    if mode == "spatial_per_channel":
        return conv.out_channels, kk
    raise ValueError(f"unknown statistic mode {mode!r}; choose one of {', '.join(STATISTIC_MODES)}")


def statistic_rows(conv: nn.Conv2d, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The vectors the conv's weight rows multiply, from its input x (N, C, H, W): shape (batch, rows, n)."""
    kernel = dict(kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    n, c = x.shape[:2]
    if mode == "full":  # unfold orders patch values channel-major, like weight.flatten(1)
        if conv.groups != 1:
            raise ValueError("the 'full' statistic needs an ungrouped conv")
        return F.unfold(x, **kernel).transpose(1, 2).reshape(1, -1, c * _kk(conv))
    if mode == "channel":
        return x.permute(0, 2, 3, 1).reshape(1, -1, c)
    patches = F.unfold(x.reshape(n * c, 1, *x.shape[2:]), **kernel)  # (N·C, k·k, L)
    if mode == "spatial":
        return patches.transpose(1, 2).reshape(1, -1, _kk(conv))
    if mode == "spatial_per_channel":
        return patches.reshape(n, c, _kk(conv), -1).permute(1, 0, 3, 2).reshape(c, -1, _kk(conv))
    raise ValueError(f"unknown statistic mode {mode!r}; choose one of {', '.join(STATISTIC_MODES)}")


def _kk(conv: nn.Conv2d) -> int:
    return conv.kernel_size[0] * conv.kernel_size[1]


class CovarianceAccumulator:
    """Streaming second moment E[x xᵀ] (or the centred covariance) of row vectors, accumulated in float64.

    `update(rows)` takes (batch, rows, n) or (rows, n); at most `max_rows_per_update` rows of each update are
    used (a random subset from `generator`, so a fixed seed gives fixed statistics)."""

    def __init__(self, n: int, batch: int = 1, max_rows_per_update: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.n, self.batch = n, batch
        self.max_rows = max_rows_per_update
        self.generator = generator
        self.sum_outer: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.count = 0

    def update(self, rows: torch.Tensor) -> None:
        if rows.dim() == 2:
            rows = rows.unsqueeze(0)
        if rows.shape[0] != self.batch or rows.shape[2] != self.n:
            raise ValueError(f"expected rows of shape ({self.batch}, *, {self.n}), got {tuple(rows.shape)}")
        if self.max_rows is not None and rows.shape[1] > self.max_rows:
            pick = torch.randperm(rows.shape[1], generator=self.generator)[: self.max_rows]
            rows = rows[:, pick.to(rows.device)]
        rows = rows.detach().double()
        outer = rows.transpose(1, 2) @ rows
        total = rows.sum(dim=1)
        if self.sum_outer is None:
            self.sum_outer, self.sum = outer, total
        else:
            self.sum_outer += outer
            self.sum += total
        self.count += rows.shape[1]

    def covariance(self, centered: bool = False) -> torch.Tensor:
        """(batch, n, n) float64: E[x xᵀ], or E[(x - μ)(x - μ)ᵀ] when `centered`."""
        if self.count == 0:
            raise ValueError("no rows were accumulated: the layer never ran during calibration")
        second = self.sum_outer / self.count
        if centered:
            mean = self.sum / self.count
            second = second - mean.unsqueeze(2) * mean.unsqueeze(1)
        return 0.5 * (second + second.transpose(1, 2))


def pca(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors (columns) of symmetric matrices (..., n, n),
    by `torch.linalg.eigh` in float64."""
    values, vectors = torch.linalg.eigh(cov.double())
    return values.flip(-1).clamp(min=0.0), vectors.flip(-1)
