"""Bi-Real Net (Liu et al., ECCV 2018): a real shortcut around every binary conv, ApproxSign activations.

Unit: sign (ApproxSign gradient) -> binary conv (alpha * sign(W), alpha = mean|W| per output channel) -> BN,
plus the shortcut; no other nonlinearity. Downsample shortcut: AvgPool(2) -> real 1x1 conv -> BN. Stem
conv + BN (+ max-pool), no ReLU, as the official PyTorch code. Variants differ only in the weight gradient:
'pytorch' (default; clamp STE with alpha detached, the official PyTorch re-implementation) and 'paper'
(magnitude-aware gradient alpha * 1{|W| <= 1}).
"""
from __future__ import annotations

from torch import nn

from baselines import archs
from baselines.archs.common import BinaryStyle, InputQuantizerFactory, WeightQuantizerFactory
from baselines.fp import SMALL_FAMILY_BUDGET, check_family, check_variant
from baselines.quantizers import ApproxSign, ScaledSignWeight
from baselines.recipe import MethodSpec, Optim, Recipe, Stage

VARIANTS = ("pytorch", "paper")


class BiRealStyle(BinaryStyle):
    """Bi-Real's unit: ApproxSign -> binary conv -> BN, a real shortcut around each conv, no ReLU."""

    name = "bireal"
    conv_shortcuts = True
    stem_act = False

    def __init__(self, weight_grad: str = "clamp", input_quantizer: InputQuantizerFactory | None = None,
                 weight_quantizer: WeightQuantizerFactory | None = None) -> None:
        super().__init__(input_quantizer or (lambda channels: ApproxSign()),
                         weight_quantizer or (lambda: ScaledSignWeight(weight_grad)))


def build(arch: str, num_classes: int, in_channels: int, image_size: int, variant: str = "pytorch") -> nn.Module:
    check_variant("bireal", VARIANTS, variant)
    style = BiRealStyle("magnitude_aware" if variant == "paper" else "clamp")
    return archs.build(arch, style, num_classes, in_channels, image_size)


def recipe(family: str, variant: str = "pytorch") -> Recipe:
    """The official PyTorch from-scratch recipe (both variants): Adam 1e-3 linear to 0, wd 0, CE with label
    smoothing 0.1. The paper's Caffe recipe (SGD 20 epochs from a three-step real-valued pre-training, then a
    BN-only epoch) is not implemented: its pre-training is not reproducible (Bi-Real-net issue #9)."""
    check_family(family)
    check_variant("bireal", VARIANTS, variant)
    if family == "imagenet":
        epochs, batch = 256, 512
        source = ("liuzechun/Bi-Real-net README, PyTorch implementation: Adam lr 1e-3 linear decay over 256 epochs, "
                  "batch 512, wd 0, label smoothing 0.1, from scratch")
    else:
        epochs, batch = SMALL_FAMILY_BUDGET[family]
        source = (f"[ours] Bi-Real-net PyTorch recipe structure (Adam 1e-3 linear to 0, wd 0, label smoothing 0.1) "
                  f"with {epochs} epochs, batch {batch}: no paper recipe for {family}")
    stage = Stage("train", epochs, Optim("adam", lr=1e-3), schedule="linear", loss="ce", label_smoothing=0.1)
    return Recipe(stages=(stage,), batch_size=batch, source=source)


BIREAL = MethodSpec(
    name="bireal",
    description="Bi-Real Net: real shortcut around every binary conv, ApproxSign, alpha-scaled weights",
    variants=VARIANTS,
    default_variant="pytorch",
    build=build,
    recipe=recipe,
)
