"""The BiTAT backbone style: the full-precision layout with ReActNet's units, so an `fp` checkpoint loads into it.

BiTAT starts from a trained fp model and binarizes it layer by layer, so the model keeps the fp backbone's
module tree (same builder, same names: every fp conv/BN/FC tensor transfers) and swaps in ReActNet's parts:
each backbone conv becomes a `BinaryConv2d` with an RSign input quantizer, each fp nonlinearity an RPReLU
initialised to act like it (slope 0 = ReLU; slope 1 = identity where fp has none), and the weight quantizer is
BiTAT's importance-aware binarizer. Stem, classifier and ResNet-18/34's 1×1 projection shortcuts stay real.
"""
from __future__ import annotations

import torch
from torch import nn

from baselines.archs.common import Style
from baselines.layers import RPReLU
from baselines.reactnet import ReActStyle
from bitat.quantizer import ImportanceAwareSign, QuantizerOptions


class BitatStyle(ReActStyle):
    """ReActNet units in the fp layout. `quantizer=None` keeps ReActNet's mean|w| binarizer (the no-transform
    ablation); `relu_slope` is the RPReLU slope replacing an fp ReLU (0: the fp function is kept at the start)."""

    name = "bitat"
    conv_shortcuts = False  # the fp layout: one shortcut per ResNet basic block, as the fp checkpoint has
    stem_act = True  # the fp stem, nonlinearity included

    def __init__(self, quantizer: QuantizerOptions | None = QuantizerOptions(), relu_slope: float = 0.0) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.relu_slope = relu_slope

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Module:
        layer = super().conv(cin, cout, k, stride, groups)
        if self.quantizer is not None:
            layer.weight_quantizer = ImportanceAwareSign(layer, self.quantizer)
        return layer

    def act(self, channels: int, default) -> nn.Module:
        act = RPReLU(channels)
        with torch.no_grad():
            act.prelu.weight.fill_(self.relu_slope if default is not None else 1.0)
        return act

    def downsample(self, cin: int, cout: int, stride: int) -> nn.Module:
        return Style.downsample(self, cin, cout, stride)  # the fp model's projection, so its weights transfer

    def __repr__(self) -> str:
        return f"BitatStyle(quantizer={self.quantizer!r}, relu_slope={self.relu_slope})"
