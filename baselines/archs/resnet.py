"""ResNets for every method: CIFAR ResNet-20 and ResNet-18/34, built from a method `Style`.

- resnet20: He et al.'s CIFAR net (16/32/64 channels, 3x3 basic blocks per stage), 3x3 stride-1 stem at
  any input size, option-A shortcuts (stride subsample + zero channel padding, parameter-free, as IR-Net's
  binary ResNet-20), so every conv except stem and classifier is binarized.
- resnet18/34: torchvision's layout. ImageNet stem (7x7/2 conv + BN + ReLU + 3x3/2 max-pool) when
  image_size >= 128, CIFAR stem (3x3 stride-1 conv, no max-pool) below. Downsampling shortcuts are the
  method's (`Style.downsample`: torchvision's 1x1/stride conv for fp and XNOR; Bi-Real's AvgPool + 1x1 + BN).
- With `conv_shortcuts` (Bi-Real, ReActNet) a basic block is two one-conv units, each with its own shortcut
  (the first carries the downsample), like the official `birealnet18` ([4, 4, 4, 4] one-conv blocks); the
  model's `blocks` still lists basic blocks (8 for ResNet-18) so every method groups layers the same way.
"""
from __future__ import annotations

from torch import nn

from baselines.archs.common import (IMAGENET_STEM_MIN_SIZE, Network, PadShortcut, Residual, Style, head,
                                    init_fp_, stem)


def _relu() -> nn.Module:
    return nn.ReLU(inplace=True)


def basic_block(style: Style, cin: int, cout: int, stride: int, option_a: bool) -> nn.Module:
    """Two 3x3 convs with the method's unit order, shortcut placement and nonlinearity."""
    if stride != 1 or cin != cout:
        shortcut = PadShortcut(cin, cout, stride) if option_a else style.downsample(cin, cout, stride)
    else:
        shortcut = nn.Identity()
    if style.conv_shortcuts:
        return nn.Sequential(
            Residual(style.unit(cin, cout, 3, stride), shortcut, style.act(cout, _relu)),
            Residual(style.unit(cout, cout, 3), nn.Identity(), style.act(cout, _relu)))
    body = nn.Sequential(style.unit(cin, cout, 3, stride), style.act(cout, _relu), style.unit(cout, cout, 3))
    return Residual(body, shortcut, style.act(cout, _relu))


def resnet(style: Style, widths: tuple[int, ...], depths: tuple[int, ...], num_classes: int, in_channels: int,
           imagenet_stem: bool, option_a: bool) -> Network:
    """A ResNet with basic blocks: stage i has depths[i] blocks of widths[i] channels, stride 2 from stage 2."""
    if imagenet_stem:
        first = stem(style, in_channels, widths[0], 7, 2, max_pool=True)
    else:
        first = stem(style, in_channels, widths[0], 3, 1, max_pool=False)
    blocks: list[nn.Module] = []
    cin = widths[0]
    for i, (width, depth) in enumerate(zip(widths, depths)):
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            blocks.append(basic_block(style, cin, width, stride, option_a))
            cin = width
    model = Network(first, blocks, head(style, cin), cin, num_classes)
    if not style.binary:
        init_fp_(model)
    return model


def resnet20(style: Style, num_classes: int, in_channels: int, image_size: int) -> Network:
    """CIFAR ResNet-20 (He et al. 2016, option A); the stem is 3x3 stride 1 at every input size."""
    return resnet(style, (16, 32, 64), (3, 3, 3), num_classes, in_channels, imagenet_stem=False, option_a=True)


def resnet18(style: Style, num_classes: int, in_channels: int, image_size: int) -> Network:
    """ResNet-18 (torchvision layout); CIFAR stem below 128 px."""
    return resnet(style, (64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels,
                  imagenet_stem=image_size >= IMAGENET_STEM_MIN_SIZE, option_a=False)


def resnet34(style: Style, num_classes: int, in_channels: int, image_size: int) -> Network:
    """ResNet-34 (torchvision layout); CIFAR stem below 128 px."""
    return resnet(style, (64, 128, 256, 512), (3, 4, 6, 3), num_classes, in_channels,
                  imagenet_stem=image_size >= IMAGENET_STEM_MIN_SIZE, option_a=False)
