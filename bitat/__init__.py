"""BiTAT (reconstruction): importance-aware orthonormal transformation with progressive bottom-to-top binarization.

`METHODS` holds `bitat` and its ablations `bitat-no-progressive` and `bitat-no-transform`; `benchmark.models`
registers them. What is the paper's and what is ours: docs/bitat.md.
"""
from bitat.method import BITAT, BITAT_NO_PROGRESSIVE, BITAT_NO_TRANSFORM, METHODS, BitatConfig

__all__ = ["METHODS", "BITAT", "BITAT_NO_PROGRESSIVE", "BITAT_NO_TRANSFORM", "BitatConfig"]
