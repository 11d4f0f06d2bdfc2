"""Optimizers and learning-rate schedules from a recipe stage (`baselines.recipe.Optim`, `Stage`)."""
from __future__ import annotations

import math

import torch
from torch import nn

from baselines.recipe import Optim, Stage
from benchmark.errors import BitbenchError


def _decays(name: str, param: torch.Tensor, rule: str) -> bool:
    if rule == "all":
        return True
    if rule == "conv":  # ReActNet: only 4-D convolution weights
        return param.ndim == 4
    if rule == "no_norm_bias":  # timm's usual rule: no decay on biases and norm/scale vectors
        return param.ndim > 1
    raise BitbenchError(f"unknown weight-decay rule {rule!r} (valid: all, conv, no_norm_bias)")


def param_groups(model: nn.Module, optim: Optim) -> list[dict]:
    """Trainable parameters split by weight decay and by `group_lr` name patterns (first match wins)."""
    groups: dict[tuple[float, float], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = next((g_lr for pattern, g_lr in optim.group_lr if pattern in name), optim.lr)
        wd = optim.weight_decay if _decays(name, p, optim.decay_on) else 0.0
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "initial_lr": lr, "weight_decay": wd}
            for (lr, wd), ps in sorted(groups.items(), key=lambda kv: kv[0])]


def build_optimizer(model: nn.Module, optim: Optim) -> torch.optim.Optimizer:
    groups = param_groups(model, optim)
    if not groups:
        raise BitbenchError("the stage has no trainable parameters")
    if optim.name == "adam":
        return torch.optim.Adam(groups, lr=optim.lr, betas=optim.betas)
    if optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov)
    raise BitbenchError(f"unknown optimizer {optim.name!r} (valid: adam, adamw, sgd)")


def lr_factor(stage: Stage, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at `step` (0-based) of a stage lasting `total_steps` steps."""
    warmup = int(round(stage.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if stage.schedule == "constant":
        return 1.0
    if stage.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if stage.schedule == "linear":  # to zero at the end, as ReActNet's LambdaLR(1 - epoch/epochs)
        return 1.0 - progress
    if stage.schedule == "step":  # x0.1 at each milestone (in epochs)
        epoch = step / max(1, steps_per_epoch)
        return 0.1 ** sum(epoch >= m for m in stage.milestones)
    raise BitbenchError(f"unknown schedule {stage.schedule!r} (valid: cosine, linear, step, constant)")


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor
    return optimizer.param_groups[0]["lr"]
