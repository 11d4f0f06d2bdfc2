"""BiTAT and its two ablations as registered methods: options, variants, model builder and recipes.

Every open choice of the reconstruction (docs/bitat.md) is a field of `BitatConfig`; a variant is a named
config. The recipes start from the finished `fp` run of the same dataset and architecture (`init_from='fp'`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from baselines import archs
from baselines.fp import check_family, check_variant
from baselines.recipe import MethodSpec, Optim, Recipe, Stage
from bitat.quantizer import QuantizerOptions
from bitat.schedule import UNITS, Calibrate, SetModes, link_blocks
from bitat.style import BitatStyle

__all__ = ["BitatConfig", "FamilyPlan", "PLANS", "TRANSFORM_LR_PATTERN", "build_model", "make_recipe",
           "BITAT", "BITAT_NO_PROGRESSIVE", "BITAT_NO_TRANSFORM", "METHODS"]

LOSSES = ("ce", "kd", "ce+kd")
TRANSFORM_LR_PATTERN = "bitat_transform"  # substring of every V / s parameter name (Optim.group_lr)
REG_WEIGHT = 1e-2  # λ of the 'scale-reg' and 'reading-b' variants [ours, untuned; see docs/bitat.md]


@dataclass(frozen=True)
class BitatConfig:
    """progressive: bottom-to-top stages (False: every layer binarized in one stage). transform: V, s and the
    importance-aware binarizer (False: ReActNet's mean|w| scale). unit: 'layer' or 'block' per progressive unit.
    block_transforms: 'frozen' (a frozen layer's V, s freeze with it) or 'trainable' (the current block's lower
    transforms keep training). loss: 'ce', 'kd' or 'ce+kd' (KD from the fp run). final_finetune: a last stage
    training only the non-binary parameters. relu_slope: RPReLU slope replacing an fp ReLU."""

    progressive: bool = True
    transform: bool = True
    unit: str = "layer"
    quantizer: QuantizerOptions = field(default_factory=QuantizerOptions)
    block_transforms: str = "frozen"
    loss: str = "ce"
    final_finetune: bool = True
    relu_slope: float = 0.0

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unknown progressive unit {self.unit!r}; choose one of {', '.join(UNITS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.block_transforms not in ("frozen", "trainable"):
            raise ValueError(f"block_transforms must be 'frozen' or 'trainable', got {self.block_transforms!r}")


@dataclass(frozen=True)
class FamilyPlan:
    """Per dataset family [ours, no paper numbers]: `steps` progressive stages of `epochs_per_step` epochs, a final
    fine-tune of `final_epochs`, Adam learning rates for weights / V and s / the final stage, PCA batches."""

    steps: int
    epochs_per_step: float
    final_epochs: float
    batch_size: int
    lr: float
    transform_lr: float
    final_lr: float
    calibrate_batches: int
    rows_per_batch: int = 8192


PLANS = {
    "mnist": FamilyPlan(steps=4, epochs_per_step=2, final_epochs=2, batch_size=128, lr=1e-3, transform_lr=1e-3,
                        final_lr=5e-4, calibrate_batches=4, rows_per_batch=4096),
    "cifar": FamilyPlan(steps=16, epochs_per_step=3, final_epochs=8, batch_size=128, lr=5e-4, transform_lr=1e-3,
                        final_lr=1e-4, calibrate_batches=8),
    "imagenet": FamilyPlan(steps=16, epochs_per_step=2, final_epochs=4, batch_size=256, lr=5e-4,
                           transform_lr=1e-3, final_lr=1e-4, calibrate_batches=8),
}

BITAT_VARIANTS = {
    "layerwise": BitatConfig(),
    "blockwise": BitatConfig(unit="block"),
    "scale-reg": BitatConfig(quantizer=QuantizerOptions(reg_weight=REG_WEIGHT)),
    "reading-b": BitatConfig(unit="block", quantizer=QuantizerOptions(reg_weight=REG_WEIGHT, reading="B")),
    "figure": BitatConfig(block_transforms="trainable"),
    "kd": BitatConfig(loss="kd"),
    "ce-kd": BitatConfig(loss="ce+kd"),
}
NO_PROGRESSIVE_VARIANTS = {"one-stage": BitatConfig(progressive=False)}
NO_TRANSFORM_VARIANTS = {"layerwise": BitatConfig(transform=False),
                         "blockwise": BitatConfig(transform=False, unit="block")}

_SOURCE = ("BiTAT reconstruction (arXiv 2207.01394; equations unread, see docs/bitat.md). Paper: start from a "
           "trained fp model, trainable orthonormal V and importance s initialised by PCA, importance-based "
           "binarization, progressive bottom-to-top quantization with frozen quantized layers and fine-tuned "
           "layers above. Ours: Σ-optimal per-channel scale, Cayley V, softplus s normalised to Σs = n, "
           "ReActNet units (RSign/RPReLU) in the fp layout, Adam, cosine per stage, wd 0, {steps} stages of "
           "{per} epochs ({unit}s split evenly), {final}, batch {batch}, lr {lr} (V/s {tlr}), PCA on {calib} "
           "batches, loss {loss}; variant {variant!r}")


def build_model(config: BitatConfig, arch: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """`arch` with BiTAT's style; module names equal the fp model's, so the fp checkpoint loads into it."""
    style = BitatStyle(config.quantizer if config.transform else None, relu_slope=config.relu_slope)
    model = archs.build(arch, style, num_classes, in_channels, image_size)
    link_blocks(model)
    return model


def make_recipe(config: BitatConfig, family: str, variant: str) -> Recipe:
    """The stage plan of `config` on a dataset family: progressive (or one) binarization stages + final fine-tune."""
    check_family(family)
    plan = PLANS[family]
    group_lr = ((TRANSFORM_LR_PATTERN, plan.transform_lr),) if config.transform else ()
    optim = Optim("adam", lr=plan.lr, weight_decay=0.0, decay_on="conv", group_lr=group_lr)
    common = dict(schedule="cosine", loss=config.loss, calibrate_batches=plan.calibrate_batches)
    if config.progressive:
        stages = []
        for k in range(plan.steps):
            modes = SetModes(k, plan.steps, config.unit, True, config.block_transforms)
            stages.append(Stage(f"binarize-{k + 1}of{plan.steps}", plan.epochs_per_step, optim, apply=modes,
                                calibrate=Calibrate(modes, plan.rows_per_batch, transform=config.transform),
                                **common))
    else:
        modes = SetModes(None, 1, config.unit, True)
        stages = [Stage("binarize-all", plan.steps * plan.epochs_per_step, optim, apply=modes,
                        calibrate=Calibrate(modes, plan.rows_per_batch, transform=config.transform), **common)]
    if config.final_finetune:
        stages.append(Stage("finetune", plan.final_epochs, replace(optim, lr=plan.final_lr, group_lr=()),
                            apply=SetModes(None, plan.steps, config.unit, train_binary=False),
                            schedule="cosine", loss=config.loss))
    final = f"final fine-tune of the non-binary parameters for {plan.final_epochs} epochs" \
        if config.final_finetune else "no final fine-tune"
    source = _SOURCE.format(steps=plan.steps if config.progressive else 1,
                            per=plan.epochs_per_step if config.progressive else plan.steps * plan.epochs_per_step,
                            unit=config.unit, final=final, batch=plan.batch_size, lr=plan.lr,
                            tlr=plan.transform_lr, calib=plan.calibrate_batches, loss=config.loss, variant=variant)
    return Recipe(stages=tuple(stages), batch_size=plan.batch_size, teacher=None if config.loss == "ce" else "fp",
                  init_from="fp", source=source)


def _spec(name: str, description: str, variants: dict[str, BitatConfig], default: str) -> MethodSpec:
    def build(arch: str, num_classes: int, in_channels: int, image_size: int, variant: str = default) -> nn.Module:
        check_variant(name, tuple(variants), variant)
        return build_model(variants[variant], arch, num_classes, in_channels, image_size)

    def recipe(family: str, variant: str = default) -> Recipe:
        check_variant(name, tuple(variants), variant)
        return make_recipe(variants[variant], family, variant)

    build.__qualname__ = f"{name}.build"
    recipe.__qualname__ = f"{name}.recipe"
    return MethodSpec(name=name, description=description, variants=tuple(variants), default_variant=default,
                      build=build, recipe=recipe)


BITAT = _spec("bitat", "BiTAT (reconstruction): PCA-initialised orthonormal transform, importance-aware "
                       "binarization, progressive bottom-to-top from the fp run", BITAT_VARIANTS, "layerwise")
BITAT_NO_PROGRESSIVE = _spec("bitat-no-progressive", "BiTAT ablation: the transform without the progressive "
                                                     "schedule (all layers binarized in one stage)",
                             NO_PROGRESSIVE_VARIANTS, "one-stage")
BITAT_NO_TRANSFORM = _spec("bitat-no-transform", "BiTAT ablation: the progressive schedule without the transform "
                                                 "(ReActNet's mean|w| scale)", NO_TRANSFORM_VARIANTS, "layerwise")
METHODS = (BITAT, BITAT_NO_PROGRESSIVE, BITAT_NO_TRANSFORM)
