"""Binarization primitives and the baseline methods: full precision, XNOR-Net, Bi-Real Net, ReActNet.

`METHODS` lists their `MethodSpec`s; `benchmark.models` registers every package's `METHODS` (bitat's too).
"""
from baselines.bireal import BIREAL
from baselines.fp import FP
from baselines.reactnet import REACTNET
from baselines.xnor import XNOR

METHODS = (FP, XNOR, BIREAL, REACTNET)

__all__ = ["METHODS", "FP", "XNOR", "BIREAL", "REACTNET"]
