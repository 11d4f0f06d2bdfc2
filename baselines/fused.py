"""Fused CPU kernels for RSign and RPReLU (`csrc/react_units.cpp`): one pass forward, one backward with the
per-channel reductions, where eager PyTorch needs 3-5 passes each. Compiled on first use with torch's
`cpp_extension` (needs g++ and ninja; cached in torch's extension dir, shared safely by concurrent processes
through torch's build lock). `BITBENCH_FUSED=0` forces the eager code; a failed build warns once and falls back.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["available", "ops", "fits", "fits_tiled"]

_SOURCE = Path(__file__).with_name("csrc") / "react_units.cpp"
_DTYPES = (torch.float32, torch.float64)
_module: ModuleType | None = None
_failed = False


def _build() -> ModuleType | None:
    global _module, _failed
    try:
        from torch.utils.cpp_extension import load

        # -ffp-contract=off: no fused multiply-adds, every value rounds as in the eager ops; -fno-trapping-math
        # lets the compiler vectorize the selects (it changes no value); -fopenmp: at::parallel_for is an OpenMP
        # pragma in ATen's headers, so without it the kernels run on one thread (linked to torch's libgomp).
        _module = load(name="bitbench_react_units", sources=[str(_SOURCE)],
                       extra_cflags=["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler, no ninja, no headers...: train on, eagerly
        _failed = True
        cause = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
        warnings.warn(f"bitbench: fused RSign/RPReLU kernels unavailable, using eager PyTorch ({cause})",
                      RuntimeWarning, stacklevel=3)
    return _module


def ops() -> ModuleType | None:
    """The compiled kernels, building them on first call; None if disabled (`BITBENCH_FUSED=0`) or unbuildable."""
    if os.environ.get("BITBENCH_FUSED", "1") == "0" or _failed:
        return None
    return _module if _module is not None else _build()


def available() -> bool:
    """Whether the fused kernels are enabled and built (builds them if needed)."""
    return ops() is not None


def fits(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """Whether the kernels compute exactly what eager broadcasting would: x on the CPU in float32/float64 with
    channels on dim 1, each parameter of x's dtype and rank with shape (1, C, 1, ...)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.dim() < 2:
        return False
    c = x.shape[1]
    for p in params:
        if p.device.type != "cpu" or p.dtype != x.dtype or p.dim() != x.dim() or p.numel() != c or p.shape[1] != c:
            return False
    return True


def fits_tiled(x: torch.Tensor, residual: torch.Tensor, tiles: int) -> bool:
    """Whether `residual` tiled `tiles` times along dim 1 has x's shape, device and dtype (RPReLU's residual)."""
    return (residual.device == x.device and residual.dtype == x.dtype and residual.dim() == x.dim()
            and tiles >= 1 and residual.shape[1] * tiles == x.shape[1]
            and residual.shape[0] == x.shape[0] and residual.shape[2:] == x.shape[2:])
