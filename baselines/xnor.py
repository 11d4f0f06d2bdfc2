"""XNOR-Net (Rastegari et al., ECCV 2016): alpha-scaled binary weights, sign activations, BN -> sign -> BinConv.

- Weights: alpha * sign(W), alpha = ||W_c||_1 / n per output channel, with the exact chain-rule gradient
  through alpha (`ScaledSignWeight('xnor_exact')`, as the XNOR-Net-PyTorch port computes it).
- Activations: sign with the clipped STE. Block order as the official code: BN -> sign -> BinConv, no ReLU
  (pre-activation: a BN + ReLU head before pooling normalises the last residual sum).
- ResNet shortcuts: torchvision's real 1x1 projection (CIFAR ResNet-20: option A). First conv and classifier FP.

Variants: 'noK' (default; the released allenai/XNOR-Net code has no activation scaling) and 'K' (the
paper's K map: channel mean of |I| box-filtered with each conv's kernel, multiplied into the output).
"""
from __future__ import annotations

from torch import nn

from baselines import archs
from baselines.archs.common import BinaryStyle, Style, InputQuantizerFactory, WeightQuantizerFactory
from baselines.fp import SMALL_FAMILY_BUDGET, check_family, check_variant
from baselines.quantizers import ScaledSignWeight, SteSign
from baselines.recipe import MethodSpec, Optim, Recipe, Stage

VARIANTS = ("noK", "K")


class XnorStyle(BinaryStyle):
    """XNOR-Net's unit: BN -> sign -> binary conv (with K when `activation_scale`)."""

    name = "xnor"
    head_norm = True

    def __init__(self, activation_scale: bool = False, input_quantizer: InputQuantizerFactory | None = None,
                 weight_quantizer: WeightQuantizerFactory | None = None) -> None:
        super().__init__(input_quantizer or (lambda channels: SteSign()),
                         weight_quantizer or (lambda: ScaledSignWeight("xnor_exact")), activation_scale)

    def unit(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Module:
        return nn.Sequential(nn.BatchNorm2d(cin), self.conv(cin, cout, k, stride, groups))

    def downsample(self, cin: int, cout: int, stride: int) -> nn.Module:
        return Style.downsample(self, cin, cout, stride)  # torchvision's projection, not Bi-Real's


def build(arch: str, num_classes: int, in_channels: int, image_size: int, variant: str = "noK") -> nn.Module:
    check_variant("xnor", VARIANTS, variant)
    return archs.build(arch, XnorStyle(activation_scale=variant == "K"), num_classes, in_channels, image_size)


def _regime(epochs: tuple[int, ...]) -> tuple[Stage, ...]:
    """allenai/XNOR-Net paramsForEpoch: (lr, weight decay) per epoch range, each a constant-lr Adam stage."""
    settings = ((1e-2, 5e-4), (5e-3, 5e-4), (1e-3, 0.0), (5e-4, 0.0), (1e-4, 0.0))
    return tuple(Stage(f"regime{i + 1}", e, Optim("adam", lr=lr, weight_decay=wd), schedule="constant")
                 for i, (e, (lr, wd)) in enumerate(zip(epochs, settings)))


def recipe(family: str, variant: str = "noK") -> Recipe:
    """The official Torch7 regime (Adam; epochs 1-18 lr 1e-2 wd 5e-4, 19-29 5e-3, 30-43 1e-3 wd 0, 44-52 5e-4,
    53-55 1e-4), batch 128 as the author advises (issue #2); scaled to the suite budget on small datasets."""
    check_family(family)
    check_variant("xnor", VARIANTS, variant)
    imagenet = Recipe(
        stages=_regime((18, 11, 14, 9, 3)), batch_size=128,
        source="allenai/XNOR-Net main.lua/paramsForEpoch regime (Adam, 55 epochs, wd 5e-4 then 0 on all params); "
               "batch 128 on 1 GPU per the author in issue #2 (the README command uses 800 on 4 GPUs); "
               "Adam moments restart at each regime change")
    if family == "imagenet":
        return imagenet
    epochs, batch = SMALL_FAMILY_BUDGET[family]
    scaled = imagenet.with_overrides(epochs=epochs, batch_size=batch)
    return Recipe(stages=scaled.stages, batch_size=batch,
                  source=f"[ours] XNOR-Net's ImageNet regime (Adam, same lr/wd steps at the same fractions) "
                         f"scaled to {epochs} epochs, batch {batch}: no paper recipe for {family}")


XNOR = MethodSpec(
    name="xnor",
    description="XNOR-Net: alpha-scaled sign weights, sign activations, BN -> sign -> BinConv",
    variants=VARIANTS,
    default_variant="noK",
    build=build,
    recipe=recipe,
)
