"""BiTAT's trainable transformation of one layer: an orthonormal correlation matrix V and a positive, normalised
importance vector s, so that Σ = V diag(s) Vᵀ weights the layer's binarization error (methods.md §3.4).

V is `torch.nn.utils.parametrizations.orthogonal` (Cayley map by default), so it stays orthonormal under any
optimizer; s = softplus(raw), renormalised so that Σ s = n (Reading A) or so that the concatenated s of the
block's layers sums to Σ n (Reading B). Both start from a PCA of the layer's input statistics.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from bitat.statistics import pca

__all__ = ["ORTHOGONAL_MAPS", "READINGS", "ImportanceTransform", "aggregate", "link_block"]

ORTHOGONAL_MAPS = ("cayley", "matrix_exp", "householder")
READINGS = ("A", "B")
_MIN_IMPORTANCE = 1e-6  # floor of the initial s (relative to its mean), keeps softplus⁻¹ finite


class _Basis(nn.Module):
    """Holder of the (batch, n, n) matrix that the orthogonal parametrization constrains."""

    def __init__(self, batch: int, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(n).repeat(batch, 1, 1))


class ImportanceTransform(nn.Module):
    """V (batch, n, n), orthonormal, and s (batch, n), positive: `batch` independent transforms of size n
    (batch > 1 only for per-channel depthwise statistics). Starts as V = I, s = 1 until `init_from_covariance`."""

    def __init__(self, n: int, batch: int = 1, orthogonal_map: str = "cayley", reading: str = "A") -> None:
        super().__init__()
        if orthogonal_map not in ORTHOGONAL_MAPS:
            raise ValueError(f"unknown orthogonal_map {orthogonal_map!r}; choose one of {', '.join(ORTHOGONAL_MAPS)}")
        if reading not in READINGS:
            raise ValueError(f"unknown aggregation reading {reading!r}; choose 'A' or 'B'")
        self.n, self.batch, self.reading = n, batch, reading
        self.basis = _Basis(batch, n)
        parametrizations.orthogonal(self.basis, "weight", orthogonal_map=orthogonal_map)
        self.importance_raw = nn.Parameter(torch.full((batch, n), _softplus_inverse(torch.tensor(1.0)).item()))
        self._peers: tuple[ImportanceTransform, ...] = (self,)  # the block's transforms (Reading B), unregistered

    def basis_matrix(self) -> torch.Tensor:
        """V, shape (batch, n, n), columns orthonormal."""
        return self.basis.weight

    def importance(self) -> torch.Tensor:
        """s, shape (batch, n), positive; Σ s = n per matrix (Reading A) or Σ over the block = Σ n (Reading B)."""
        s = F.softplus(self.importance_raw)
        if self.reading == "A" or len(self._peers) == 1:
            return s * (self.n / s.sum(dim=1, keepdim=True))
        total = sum(F.softplus(p.importance_raw).sum() for p in self._peers)
        size = sum(p.importance_raw.numel() for p in self._peers)
        return s * (size / total)

    def sigma(self) -> torch.Tensor:
        """Σ = V diag(s) Vᵀ, shape (batch, n, n)."""
        v = self.basis_matrix()
        return (v * self.importance().unsqueeze(1)) @ v.transpose(1, 2)

    @torch.no_grad()
    def init_from_covariance(self, cov: torch.Tensor) -> None:
        """V, s ← PCA of the second-moment matrices `cov` (batch, n, n). Reading A starts s at the eigenvalues
        normalised per layer; Reading B keeps their magnitudes, so the block-wide normalisation ranks the
        directions of different layers by their real input energy. A dead input (Σ = 0) gives V = I, s = 1."""
        if cov.shape != (self.batch, self.n, self.n):
            raise ValueError(f"covariance of shape {tuple(cov.shape)} does not fit a transform of "
                             f"shape ({self.batch}, {self.n}, {self.n})")
        values, vectors = pca(cov)
        mean = values.mean(dim=1, keepdim=True)
        dead = (mean <= 0).squeeze(1)
        if self.reading == "A":
            target = values / mean.clamp(min=torch.finfo(values.dtype).tiny)
            floor = _MIN_IMPORTANCE
        else:
            target = values
            floor = _MIN_IMPORTANCE * mean.clamp(min=torch.finfo(values.dtype).tiny)
        target = torch.maximum(target, torch.as_tensor(floor, dtype=values.dtype))
        eye = torch.eye(self.n, dtype=vectors.dtype, device=vectors.device)
        vectors[dead] = eye
        target[dead] = 1.0
        device, dtype = self.importance_raw.device, self.importance_raw.dtype
        self.basis.weight = vectors.to(device=device, dtype=dtype)
        self.importance_raw.copy_(_softplus_inverse(target).to(device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"n={self.n}, batch={self.batch}, reading={self.reading!r}"


def _softplus_inverse(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y, stable for small and large y: y + log(-expm1(-y))."""
    y = y.double()
    return y + torch.log(-torch.expm1(-y))


def link_block(transforms: list[ImportanceTransform]) -> None:
    """Make the transforms of one block each other's peers: under Reading B their s are normalised together."""
    peers = tuple(transforms)
    for t in transforms:
        t._peers = peers


@torch.no_grad()
def aggregate(transforms: list[ImportanceTransform]) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's aggregated transformation as the concept figure draws it: the concatenated importance vector
    S = [s(0); s(1); ...] and the block-diagonal correlation matrix V = diag(V(0), V(1), ...)."""
    vs = [v for t in transforms for v in t.basis_matrix().unbind(0)]
    s = torch.cat([t.importance().flatten() for t in transforms])
    return s, torch.block_diag(*vs)
