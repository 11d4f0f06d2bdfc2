"""A method's training recipe as data: the only method-specific thing the training engine sees.

A recipe is a sequence of stages. Each stage names its optimizer, schedule, loss and length, and may carry
two hooks: `apply(model)` (cheap and deterministic: switch binarization on, freeze layers; re-run on resume
before the checkpoint is loaded) and `calibrate(model, batches)` (run once when the stage starts fresh, e.g.
BiTAT's PCA statistics; its results live in the model's state, so a resumed run does not repeat it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

ApplyHook = Callable[[nn.Module], None]
CalibrateHook = Callable[[nn.Module, Iterable[tuple[torch.Tensor, torch.Tensor]]], None]


@dataclass(frozen=True)
class Optim:
    """Optimizer settings. `decay_on` says which parameters get weight decay:
    'all', 'conv' (4-D weights only: ReActNet's rule) or 'no_norm_bias' (timm's usual rule).
    `group_lr` maps a parameter-name substring to its own learning rate (e.g. BiTAT's V and s)."""

    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    decay_on: str = "all"
    group_lr: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Stage:
    """One phase of training. `epochs` may be fractional; `schedule` is one of
    'cosine', 'linear' (to zero, ReActNet/Bi-Real PyTorch), 'step' (x0.1 at `milestones`, in epochs), 'constant'.
    `loss` is 'ce', 'kd' (soft cross-entropy against the teacher, ReActNet) or 'ce+kd' (weighted by kd_weight)."""

    name: str
    epochs: float
    optim: Optim = field(default_factory=Optim)
    schedule: str = "cosine"
    milestones: tuple[float, ...] = ()
    warmup_epochs: float = 0.0
    loss: str = "ce"
    label_smoothing: float = 0.0
    kd_weight: float = 1.0
    apply: ApplyHook | None = None
    calibrate: CalibrateHook | None = None
    calibrate_batches: int = 0

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (hooks by name), used in config.json and the config hash."""
        d = dataclasses.asdict(self)
        for hook in ("apply", "calibrate"):
            fn = getattr(self, hook)
            d[hook] = None if fn is None else getattr(fn, "__qualname__", repr(fn))
        return d


@dataclass(frozen=True)
class Recipe:
    """A method's paper recipe for one dataset family.
    `teacher`: None, 'fp' (the finished `fp` run of the same dataset and architecture) or 'torchvision:<name>'.
    `init_from`: None or 'fp' (start from that run's checkpoint: BiTAT). `source` cites where it comes from."""

    stages: tuple[Stage, ...]
    batch_size: int = 128
    teacher: str | None = None
    init_from: str | None = None
    source: str = ""

    @property
    def epochs(self) -> float:
        return sum(s.epochs for s in self.stages)

    def describe(self) -> dict[str, Any]:
        return {
            "stages": [s.describe() for s in self.stages],
            "batch_size": self.batch_size,
            "teacher": self.teacher,
            "init_from": self.init_from,
            "source": self.source,
        }

    def with_overrides(self, epochs: float | None = None, lr_scale: float | None = None,
                       batch_size: int | None = None, teacher: str | None = "keep") -> "Recipe":
        """The same recipe with a new total length (stages keep their proportions), scaled learning rates,
        another batch size or teacher. Used for the short embedded default and per-dataset profiles."""
        stages = self.stages
        if epochs is not None:
            total = self.epochs
            stages = tuple(_scale_stage(s, epochs / total) for s in stages)
        if lr_scale is not None:
            stages = tuple(dataclasses.replace(s, optim=dataclasses.replace(
                s.optim, lr=s.optim.lr * lr_scale,
                group_lr=tuple((k, v * lr_scale) for k, v in s.optim.group_lr))) for s in stages)
        return dataclasses.replace(
            self, stages=stages,
            batch_size=self.batch_size if batch_size is None else batch_size,
            teacher=self.teacher if teacher == "keep" else teacher)


def _scale_stage(stage: Stage, factor: float) -> Stage:
    return dataclasses.replace(
        stage, epochs=stage.epochs * factor,
        milestones=tuple(m * factor for m in stage.milestones),
        warmup_epochs=stage.warmup_epochs * factor)


@dataclass(frozen=True)
class MethodSpec:
    """What a method registers: its variants, a model builder and its recipes per dataset family.
    `build(arch, num_classes, in_channels, image_size, variant)` returns an nn.Module;
    `recipe(family, variant)` returns a Recipe, family in {'mnist', 'cifar', 'imagenet'}."""

    name: str
    description: str
    variants: tuple[str, ...]
    default_variant: str
    build: Callable[..., nn.Module]
    recipe: Callable[[str, str], Recipe]
    binary: bool = True
