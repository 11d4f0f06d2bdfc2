"""Backbones, each written once against a method `Style` so every method runs on every architecture.

`build(arch, style, num_classes, in_channels, image_size)` is the hook for new methods: pass a `Style`
(e.g. `baselines.reactnet.ReActStyle(weight_quantizer=...)`) to get that backbone with your quantizers.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from baselines.archs.common import IMAGENET_STEM_MIN_SIZE, BinaryStyle, Network, Style, check_sizes
from baselines.archs.mobilenet import mobilenetv1, mobilenetv2
from baselines.archs.resnet import resnet18, resnet20, resnet34

Builder = Callable[[Style, int, int, int], Network]

# name -> (builder, one-line description)
ARCHS: dict[str, tuple[Builder, str]] = {
    "resnet20": (resnet20, "CIFAR ResNet-20 (16/32/64, option-A shortcuts, 3x3 stride-1 stem)"),
    "resnet18": (resnet18, "ResNet-18 (ImageNet stem at >= 128 px, CIFAR stem below)"),
    "resnet34": (resnet34, "ResNet-34 (ImageNet stem at >= 128 px, CIFAR stem below)"),
    "mobilenetv1": (mobilenetv1, "ReActNet-A layout (MobileNetV1 with dense 3x3 convs, free shortcuts)"),
    "mobilenetv2": (mobilenetv2, "MobileNetV2 (torchvision at >= 128 px, kuangliu CIFAR strides below)"),
}

__all__ = ["ARCHS", "build", "Style", "BinaryStyle", "Network", "IMAGENET_STEM_MIN_SIZE"]


def build(arch: str, style: Style, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The backbone `arch` filled with `style`; KeyError naming the valid architectures if unknown."""
    if arch not in ARCHS:
        raise KeyError(f"unknown architecture {arch!r} (valid: {', '.join(ARCHS)})")
    check_sizes(num_classes, in_channels, image_size)
    return ARCHS[arch][0](style, num_classes, in_channels, image_size)
