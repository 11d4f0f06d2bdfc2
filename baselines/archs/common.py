"""What every backbone shares: the `Style` a method fills it with, residual wrappers, parameter-free
shortcuts and the `Network` skeleton (FP stem -> blocks -> head -> FP classifier).

A method is a `Style`: how one convolution becomes a unit (conv + BN in the method's order, with its
quantizers), which nonlinearity follows a residual sum, and which real shortcuts it adds. The backbones in
`resnet.py` and `mobilenet.py` are written once against this interface.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from baselines.layers import BinaryConv2d, tile_add

# Below this input size the backbones use a CIFAR stem (3x3 stride-1 conv, no max-pool).
IMAGENET_STEM_MIN_SIZE = 128

ActFactory = Callable[[], nn.Module]
InputQuantizerFactory = Callable[[int], nn.Module]  # channels -> activation quantizer
WeightQuantizerFactory = Callable[[], nn.Module]


class Style:
    """Full-precision style, and the base of the binary ones.

    `binary`: the method binarizes convolutions (stem and classifier always stay full precision).
    `conv_shortcuts`: a real shortcut around every convolution (Bi-Real/ReActNet) instead of one per basic block.
    `stem_act`: a nonlinearity after the stem's BN (ReActNet/Bi-Real code has none).
    `head_norm`: BN + ReLU before global pooling (pre-activation XNOR blocks end on an un-normalised sum).
    """

    name = "fp"
    binary = False
    conv_shortcuts = False
    stem_act = True
    head_norm = False

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Module:
        """One convolution of the backbone (padding k // 2, no bias): real here, BinaryConv2d in binary styles."""
        return nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)

    def unit(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Module:
        """One convolution with its normalisation in the method's order (here conv -> BN)."""
        return nn.Sequential(self.conv(cin, cout, k, stride, groups), nn.BatchNorm2d(cout))

    def act(self, channels: int, default: ActFactory | None) -> nn.Module:
        """The nonlinearity after a unit or residual sum; `default` is the FP backbone's (None: linear)."""
        return default() if default is not None else nn.Identity()

    def downsample(self, cin: int, cout: int, stride: int) -> nn.Module:
        """Projection shortcut of ImageNet ResNets (torchvision's option B: 1x1 conv with stride + BN)."""
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class BinaryStyle(Style):
    """A binary method: quantizer factories plus the method's unit order. Subclasses set the structure flags.

    `input_quantizer(channels)` and `weight_quantizer()` build one quantizer module per conv: pass other
    factories to run the same block structure with another binarizer (e.g. BiTAT's weight quantizer).
    """

    name = "binary"
    binary = True

    def __init__(self, input_quantizer: InputQuantizerFactory, weight_quantizer: WeightQuantizerFactory,
                 activation_scale: bool = False) -> None:
        self.input_quantizer = input_quantizer
        self.weight_quantizer = weight_quantizer
        self.activation_scale = activation_scale

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Module:
        return BinaryConv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False,
                            input_quantizer=self.input_quantizer(cin), weight_quantizer=self.weight_quantizer(),
                            activation_scale=self.activation_scale)

    def unit(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Module:
        """Binary conv -> BN (Bi-Real / ReActNet order; the input quantizer sits inside the conv)."""
        return nn.Sequential(self.conv(cin, cout, k, stride, groups), nn.BatchNorm2d(cout))

    def act(self, channels: int, default: ActFactory | None) -> nn.Module:
        return nn.Identity()

    def downsample(self, cin: int, cout: int, stride: int) -> nn.Module:
        """Bi-Real's downsample shortcut: AvgPool(2) -> real 1x1 conv -> BN."""
        layers: list[nn.Module] = [avg_pool(stride)] if stride > 1 else []
        return nn.Sequential(*layers, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


def avg_pool(stride: int) -> nn.Module:
    """Parameter-free spatial downsampling matching a stride-s, padding k//2 conv at any input size
    (ceil mode, so odd sizes such as 7 -> 4 agree with the conv; identical to AvgPool2d(2) on even sizes)."""
    return AvgPool(stride)


class _AvgPool2x2(torch.autograd.Function):
    """2x2 / stride-2 average of even-sized maps from four strided views, bit-identical to avg_pool2d (same
    summation order, exact division by 4) at a third of its CPU time; backward spreads grad / 4 by expansion."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x[:, :, 0::2, 0::2] + x[:, :, 0::2, 1::2]
        return out.add_(x[:, :, 1::2, 0::2]).add_(x[:, :, 1::2, 1::2]).div_(4)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, c, h, w = grad.shape
        quarter = grad.div(4).unsqueeze(-1).expand(n, c, h, w, 2).reshape(n, c, h, 2 * w)
        return quarter.unsqueeze(3).expand(n, c, h, 2, 2 * w).reshape(n, c, 2 * h, 2 * w)


class AvgPool(nn.AvgPool2d):
    """AvgPool2d(s, s, ceil_mode=True, count_include_pad=False) with a fast path for s = 2 on even sizes."""

    def __init__(self, stride: int) -> None:
        super().__init__(stride, stride, ceil_mode=True, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2 and x.dim() == 4 and x.shape[-1] % 2 == 0 and x.shape[-2] % 2 == 0:
            return _AvgPool2x2.apply(x)
        return super().forward(x)


def act_of_sum(act: nn.Module, out: torch.Tensor, residual: torch.Tensor, tiles: int = 1) -> torch.Tensor:
    """act(tile_add(out, residual, tiles)): in one call where the activation takes the residual itself
    (`adds_residual`, e.g. RPReLU's fused kernel), so the sum is never a tensor of its own."""
    if getattr(act, "adds_residual", False):
        return act(out, residual, tiles)
    return act(tile_add(out, residual, tiles))


class Residual(nn.Module):
    """act(body(x) + shortcut(x)); no sum when `shortcut` is None."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None, act: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.shortcut is None:
            return self.act(out)
        if isinstance(self.shortcut, TileChannels):  # broadcast the tiles instead of materialising the repeat
            return act_of_sum(self.act, out, self.shortcut.pool(x), self.shortcut.times)
        return act_of_sum(self.act, out, self.shortcut(x))


class TileChannels(nn.Module):
    """Parameter-free shortcut to a multiple of the channels: the input repeated `times` along channels
    (ReActNet-A's 'duplicate' generalised), after `avg_pool` when strided."""

    def __init__(self, times: int, stride: int = 1) -> None:
        super().__init__()
        self.times = times
        self.pool = avg_pool(stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        return x.repeat(1, self.times, 1, 1) if self.times > 1 else x

    def extra_repr(self) -> str:
        return f"times={self.times}"


class PadShortcut(nn.Module):
    """CIFAR ResNet option A: subsample by the stride and zero-pad the new channels (parameter-free)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_lo = (cout - cin) // 2
        self.pad_hi = cout - cin - self.pad_lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_lo}, {self.pad_hi})"


def free_shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """A parameter-free shortcut from (cin, stride) to cout where the shapes allow one: identity, AvgPool for
    stride, channel tiling when cout is a multiple of cin; None otherwise."""
    if cout % cin != 0:
        return None
    if cout == cin and stride == 1:
        return nn.Identity()
    if cout == cin:
        return avg_pool(stride)
    return TileChannels(cout // cin, stride)


class Network(nn.Module):
    """FP stem -> `blocks` (forward order) -> head -> global average pool -> FP linear classifier."""

    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module, features: int,
                 num_classes: int) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = self.head(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def stem(style: Style, in_channels: int, out_channels: int, kernel: int, stride: int, max_pool: bool) -> nn.Sequential:
    """Full-precision stem: conv -> BN (-> ReLU if the style has one) (-> 3x3/2 max-pool)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                               nn.BatchNorm2d(out_channels)]
    if style.stem_act:
        layers.append(nn.ReLU(inplace=True))
    if max_pool:
        layers.append(nn.MaxPool2d(3, 2, 1))
    return nn.Sequential(*layers)


def head(style: Style, channels: int) -> nn.Module:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) if style.head_norm else nn.Identity()


def init_fp_(model: nn.Module) -> None:
    """torchvision's initialisation for full-precision models: Kaiming-normal (fan_out) convs, BN 1/0.
    Binary models keep PyTorch's default conv init (what ReActNet's step 1 trains from)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_sizes(num_classes: int, in_channels: int, image_size: int) -> None:
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
