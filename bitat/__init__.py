"""BiTAT: importance-aware orthonormal transformation with progressive bottom-to-top binarization."""
