"""ReActNet (Liu et al., ECCV 2020): RSign / RPReLU units, distributional KD loss, two-step training.

Unit: RSign (learnable per-channel threshold, ApproxSign gradient) -> binary conv (alpha * sign(W), alpha
detached, clamp STE) -> BN -> + shortcut -> RPReLU. On ResNets this is ReAct-ResNet (Bi-Real-18/34 with these
units, AvgPool + real 1x1 + BN downsample); on mobilenetv1 it is ReActNet-A. Stem conv + BN, no ReLU.

Variants:
- 'two-step-kd' (default): step 1 trains binary activations with real weights (wd 1e-5 on 4-D weights), step 2
  binarizes the weights too and continues from step 1's weights in the same model (wd 0); KD loss only.
- 'two-step-as-written': as the released MobileNet step-2 code behaves: the binary-conv latent weights are not
  carried over but restart from rand x 0.001 (everything else is); done by step 2's `calibrate` hook.
- 'one-step-kd': both binary from the start, one stage as long as the two steps, wd 0.
- 'two-step-ce' / 'one-step-ce': hard-label cross-entropy with label smoothing 0.1 (the criterion the released
  code builds but leaves unused) instead of KD; no teacher.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from baselines import archs
from baselines.archs.common import BinaryStyle, ActFactory, InputQuantizerFactory, WeightQuantizerFactory
from baselines.fp import SMALL_FAMILY_BUDGET, check_family, check_variant
from baselines.layers import RPReLU, RSign, binary_layers, set_binarize_weights
from baselines.quantizers import ScaledSignWeight
from baselines.recipe import MethodSpec, Optim, Recipe, Stage

VARIANTS = ("two-step-kd", "two-step-as-written", "one-step-kd", "two-step-ce", "one-step-ce")


class ReActStyle(BinaryStyle):
    """ReActNet's unit: RSign -> binary conv -> BN, a shortcut around each conv, RPReLU after the sum.
    Pass `weight_quantizer` (a factory) to keep this structure with another weight binarizer."""

    name = "reactnet"
    conv_shortcuts = True
    stem_act = False

    def __init__(self, input_quantizer: InputQuantizerFactory | None = None,
                 weight_quantizer: WeightQuantizerFactory | None = None) -> None:
        super().__init__(input_quantizer or RSign, weight_quantizer or (lambda: ScaledSignWeight("clamp")))

    def act(self, channels: int, default: ActFactory | None) -> nn.Module:
        return RPReLU(channels)


def build(arch: str, num_classes: int, in_channels: int, image_size: int,
          variant: str = "two-step-kd") -> nn.Module:
    check_variant("reactnet", VARIANTS, variant)
    return archs.build(arch, ReActStyle(), num_classes, in_channels, image_size)


def real_weights(model: nn.Module) -> None:
    """Step 1: binary activations, real weights (the official step-1 code uses plain convolutions)."""
    set_binarize_weights(model, False)


def binary_weights(model: nn.Module) -> None:
    """Step 2 (and one-step): binary activations and binary weights."""
    set_binarize_weights(model, True)


def restart_binary_weights(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """As-written step 2: binary-conv latent weights restart from rand x 0.001 (no data needed)."""
    with torch.no_grad():
        for _, layer in binary_layers(model):
            layer.weight.copy_(torch.rand_like(layer.weight) * 1e-3)


def recipe(family: str, variant: str = "two-step-kd") -> Recipe:
    """Released-code recipe (ReActNet-A run.sh): Adam, lr 1.25e-3 at batch 256, LambdaLR(1 - e/E) per step,
    128 epochs per step, wd 1e-5 (step 1) then 0 on 4-D weights only, KD from a ResNet-34 teacher."""
    check_family(family)
    check_variant("reactnet", VARIANTS, variant)
    kd = variant.endswith("kd") or variant == "two-step-as-written"
    loss = dict(loss="kd") if kd else dict(loss="ce", label_smoothing=0.1)
    if family == "imagenet":
        total, batch = 256, 256
        teacher = "torchvision:resnet34" if kd else None
        source = ("liuzechun/ReActNet mobilenet run.sh + train.py: Adam lr 1.25e-3, batch 256, 128 epochs per step, "
                  "linear decay, wd 1e-5 then 0 on conv weights, KD loss only, teacher torchvision ResNet-34 "
                  "(ReAct-ResNet-18 uses batch 512 with lr 2.5e-3, the same ratio)")
    else:
        total, batch = SMALL_FAMILY_BUDGET[family]
        teacher = "fp" if kd else None
        source = (f"[ours] ReActNet's released recipe structure (Adam 1.25e-3, linear decay, wd 1e-5 then 0 on "
                  f"conv weights, {'KD from the suite fp run' if kd else 'CE'}) with {total} epochs in all, "
                  f"batch {batch}: no paper recipe for {family}")
    if variant.startswith("one-step"):
        stages = (Stage("binary", total, Optim("adam", lr=1.25e-3, weight_decay=0.0, decay_on="conv"),
                        schedule="linear", apply=binary_weights, **loss),)
        source += "; one-step variant: a single fully binary stage as long as both steps, wd 0"
    else:
        step1 = Stage("step1", total / 2, Optim("adam", lr=1.25e-3, weight_decay=1e-5, decay_on="conv"),
                      schedule="linear", apply=real_weights, **loss)
        step2 = Stage("step2", total / 2, Optim("adam", lr=1.25e-3, weight_decay=0.0, decay_on="conv"),
                      schedule="linear", apply=binary_weights, **loss,
                      calibrate=restart_binary_weights if variant == "two-step-as-written" else None)
        stages = (step1, step2)
        if variant == "two-step-as-written":
            source += "; as-written variant: step-2 binary conv weights restart from rand x 0.001"
    return Recipe(stages=stages, batch_size=batch, teacher=teacher, source=source)


REACTNET = MethodSpec(
    name="reactnet",
    description="ReActNet: RSign/RPReLU units, KD from a real teacher, two-step training",
    variants=VARIANTS,
    default_variant="two-step-kd",
    build=build,
    recipe=recipe,
)
