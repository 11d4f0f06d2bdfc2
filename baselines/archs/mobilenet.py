"""MobileNets for every method, built from a method `Style`.

- mobilenetv1: the ReActNet-A layout for every method, fp included (so fp is the matching teacher/reference):
  FP 3x3 stem (stride 2 at image_size >= 128, else 1) + BN, 13 blocks of widths
  [64, 128, 128, 256, 256, 512 x 6, 1024 x 2], stride 2 where the width changes except 32 -> 64. A block is a
  dense 3x3 conv unit (replacing the depthwise conv) with an identity / AvgPool shortcut, then a 1x1 unit with
  an identity shortcut; when the width doubles, two C -> C 1x1 units share the input, each adds the shortcut,
  and their outputs are concatenated. All shortcuts are parameter-free. Binary convs: 13 3x3 + 18 1x1 = 31.
- mobilenetv2: torchvision's MobileNetV2 (width 1.0) at image_size >= 128; below, the kuangliu CIFAR variant
  (stride-1 stem and stride 1 in the 24-channel stage). No dropout before the classifier. Binary methods
  binarize every conv except stem and classifier, depthwise 3x3 (groups = C) and the final 320 -> 1280 1x1
  included, and (the suite's convention, since binary MobileNetV2 does not train without real shortcuts)
  wrap each binary conv in a parameter-free shortcut where shapes allow: identity / AvgPool around the
  depthwise conv, channel tiling around the expansion and the 320 -> 1280 conv; the projection keeps the
  block's own residual. The 320 -> 1280 unit is the last entry of `blocks`.
"""
from __future__ import annotations

import torch
from torch import nn

from baselines.archs.common import (IMAGENET_STEM_MIN_SIZE, Network, Residual, Style, act_of_sum, free_shortcut,
                                    head, init_fp_, stem)
from baselines.layers import BinaryConv2d

REACTNET_A_WIDTHS = (32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024)
# (expansion t, channels c, repeats n, stride s) of torchvision's MobileNetV2
MOBILENETV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                   (6, 320, 1, 1))


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


def _relu6() -> nn.Module:
    return nn.ReLU6(inplace=True)


class DuplicatedResidual(nn.Module):
    """ReActNet-A's width doubling: act(cat[first(x) + x, second(x) + x]). The two units' binary convs share
    one input quantizer (the official block binarizes its input once, with one RSign)."""

    def __init__(self, first: nn.Module, second: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second
        self.act = act
        convs = [next((m for m in u.modules() if isinstance(m, BinaryConv2d)), None) for u in (first, second)]
        if convs[0] is not None and convs[1] is not None and convs[0].input_quantizer is not None:
            convs[1].input_quantizer = convs[0].input_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # cat[first(x) + x, second(x) + x] is cat[first(x), second(x)] + x tiled twice
        return act_of_sum(self.act, torch.cat([self.first(x), self.second(x)], dim=1), x, 2)


def reactnet_a_block(style: Style, cin: int, cout: int, stride: int) -> nn.Sequential:
    """3x3 unit + shortcut, then 1x1 unit + shortcut (duplicated when cout = 2 cin)."""
    spatial = Residual(style.unit(cin, cin, 3, stride), free_shortcut(cin, cin, stride), style.act(cin, _relu))
    if cout == cin:
        pointwise: nn.Module = Residual(style.unit(cin, cout, 1), nn.Identity(), style.act(cout, _relu))
    elif cout == 2 * cin:
        pointwise = DuplicatedResidual(style.unit(cin, cin, 1), style.unit(cin, cin, 1), style.act(cout, _relu))
    else:
        raise ValueError(f"ReActNet-A blocks keep or double the width, not {cin} -> {cout}")
    return nn.Sequential(spatial, pointwise)


def mobilenetv1(style: Style, num_classes: int, in_channels: int, image_size: int) -> Network:
    """ReActNet-A (MobileNetV1-derived) for any style; see the module docstring."""
    w = REACTNET_A_WIDTHS
    first = stem(style, in_channels, w[0], 3, 2 if image_size >= IMAGENET_STEM_MIN_SIZE else 1, max_pool=False)
    blocks = [reactnet_a_block(style, w[i - 1], w[i], 2 if w[i - 1] != w[i] and w[i] != 64 else 1)
              for i in range(1, len(w))]
    model = Network(first, blocks, head(style, w[-1]), w[-1], num_classes)
    if not style.binary:
        init_fp_(model)
    return model


def inverted_residual(style: Style, cin: int, cout: int, stride: int, expand: int) -> Residual:
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 linear projection (+ x when shapes match)."""
    hidden = cin * expand
    per_conv = style.binary
    layers: list[nn.Module] = []
    if expand != 1:
        layers.append(Residual(style.unit(cin, hidden, 1), free_shortcut(cin, hidden, 1) if per_conv else None,
                               style.act(hidden, _relu6)))
    layers.append(Residual(style.unit(hidden, hidden, 3, stride, groups=hidden),
                           free_shortcut(hidden, hidden, stride) if per_conv else None, style.act(hidden, _relu6)))
    layers.append(style.unit(hidden, cout, 1))
    residual = nn.Identity() if stride == 1 and cin == cout else None
    return Residual(nn.Sequential(*layers), residual, style.act(cout, None))


def mobilenetv2(style: Style, num_classes: int, in_channels: int, image_size: int) -> Network:
    """MobileNetV2 (torchvision at >= 128 px, kuangliu CIFAR strides below); see the module docstring."""
    small = image_size < IMAGENET_STEM_MIN_SIZE
    first = stem(style, in_channels, 32, 3, 1 if small else 2, max_pool=False)
    if style.stem_act:  # MobileNetV2's stem nonlinearity is ReLU6
        first[2] = _relu6()
    blocks: list[nn.Module] = []
    cin = 32
    for i, (t, c, n, s) in enumerate(MOBILENETV2_CFG):
        if small and i == 1:
            s = 1
        for j in range(n):
            blocks.append(inverted_residual(style, cin, c, s if j == 0 else 1, t))
            cin = c
    last = 1280
    blocks.append(Residual(style.unit(cin, last, 1), free_shortcut(cin, last, 1) if style.binary else None,
                           style.act(last, _relu6)))
    model = Network(first, blocks, head(style, last), last, num_classes)
    if not style.binary:
        init_fp_(model)
    return model
