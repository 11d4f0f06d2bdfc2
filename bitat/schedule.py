"""BiTAT's progressive bottom-to-top binarization as recipe stage hooks (methods.md §3.5, [ours] details).

The binary convs, in forward order, are grouped into units (one layer, or one block of `model.blocks`), and the
units are split into `steps` consecutive segments, one per stage, bottom to top. In stage k:
- segments below k: binary inputs and weights, the weights (and their V, s) frozen;
- segment k: binary inputs and weights; W, V and s train (V, s first initialised by PCA in `calibrate`);
- segments above: full precision (real inputs and weights), fine-tuning.
BN, RSign, RPReLU, stem and classifier train throughout. A recipe has no architecture, so `steps` is fixed per
recipe: with fewer units than steps a unit stays current over consecutive stages (initialised once), with more
each stage takes several. `final` stages binarize everything and train only the non-binary parameters.
`Calibrate` initialises each layer as it becomes current: its RSign threshold and, with the transform, V and s.
Hooks only set modes and requires_grad (cheap, deterministic: re-run on resume before the checkpoint loads).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from baselines.layers import BinaryConv2d, RSign, binary_layers
from bitat.quantizer import ImportanceAwareSign
from bitat.statistics import CovarianceAccumulator, statistic_rows, statistic_shape
from bitat.transform import link_block

__all__ = ["UNITS", "units", "segment", "SetModes", "Calibrate", "set_threshold", "link_blocks"]

UNITS = ("layer", "block")


def _named(hook: object, text: str) -> None:
    """Give a hook a stable, descriptive __qualname__: the engine hashes recipes with it."""
    object.__setattr__(hook, "__qualname__", text)


def units(model: nn.Module, unit: str) -> list[list[BinaryConv2d]]:
    """The binary convs of `model`, bottom to top, grouped per layer or per entry of `model.blocks`."""
    if unit not in UNITS:
        raise ValueError(f"unknown progressive unit {unit!r}; choose one of {', '.join(UNITS)}")
    if unit == "layer":
        return [[layer] for _, layer in binary_layers(model)]
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("blockwise BiTAT needs a model with `model.blocks`")
    grouped = [[layer for _, layer in binary_layers(block)] for block in blocks]
    grouped = [g for g in grouped if g]
    if sum(len(g) for g in grouped) != len(binary_layers(model)):
        raise ValueError("some binary convs of the model lie outside `model.blocks`")
    return grouped


def segment(index: int, steps: int, n_units: int) -> range:
    """Units current in stage `index` of `steps`: consecutive, bottom to top, at least one, covering all."""
    if not 0 <= index < steps:
        raise ValueError(f"stage index {index} outside 0..{steps - 1}")
    lo = math.floor(index * n_units / steps)
    hi = max(math.floor((index + 1) * n_units / steps), lo + 1)
    return range(min(lo, n_units), min(hi, n_units))


def link_blocks(model: nn.Module) -> None:
    """Make the transforms of each block peers (Reading B normalises their importance vectors together)."""
    for group in units(model, "block"):
        transforms = [q.bitat_transform for q in (l.weight_quantizer for l in group)
                      if isinstance(q, ImportanceAwareSign)]
        if transforms:
            link_block(transforms)


def _transform_params(layer: BinaryConv2d) -> list[nn.Parameter]:
    q = layer.weight_quantizer
    if isinstance(q, ImportanceAwareSign) and q.options.scale == "sigma":
        return list(q.bitat_transform.parameters())
    return []


class SetModes:
    """Stage `apply` hook. `index`/`steps`/`unit`: the progressive stage k of `steps`; `index=None` with
    `train_binary=True` makes every layer current (one-stage ablation); with `train_binary=False` every layer is
    binary and frozen (final fine-tune). `block_transforms='trainable'` keeps the V, s of frozen layers of the
    current block training (the concept figure draws S(0), V(0) trainable while w_q(1) is frozen)."""

    def __init__(self, index: int | None, steps: int, unit: str = "layer", train_binary: bool = True,
                 block_transforms: str = "frozen") -> None:
        if unit not in UNITS:
            raise ValueError(f"unknown progressive unit {unit!r}; choose one of {', '.join(UNITS)}")
        if block_transforms not in ("frozen", "trainable"):
            raise ValueError(f"block_transforms must be 'frozen' or 'trainable', got {block_transforms!r}")
        self.index, self.steps, self.unit = index, steps, unit
        self.train_binary, self.block_transforms = train_binary, block_transforms
        _named(self, f"bitat.schedule.SetModes(index={index}, steps={steps}, unit={unit!r}, "
                     f"train_binary={train_binary}, block_transforms={block_transforms!r})")

    def roles(self, model: nn.Module) -> list[tuple[BinaryConv2d, str]]:
        """Every binary conv with its role in this stage: 'frozen', 'current' or 'fp', bottom to top."""
        groups = units(model, self.unit)
        if self.index is None:
            role = "current" if self.train_binary else "frozen"
            return [(layer, role) for g in groups for layer in g]
        current = segment(self.index, self.steps, len(groups))
        out = []
        for i, g in enumerate(groups):
            role = "frozen" if i < current.start else "current" if i in current else "fp"
            out.extend((layer, role) for layer in g)
        return out

    def __call__(self, model: nn.Module) -> None:
        link_blocks(model)
        roles = self.roles(model)
        trainable_transforms = self._block_transform_layers(model, roles)
        used_input_quantizers: set[int] = set()
        for layer, role in roles:
            binary = role != "fp"
            layer.binarize_inputs = binary and layer.input_quantizer is not None
            layer.binarize_weights = binary and layer.weight_quantizer is not None
            layer.weight.requires_grad_(role != "frozen")
            for p in _transform_params(layer):
                p.requires_grad_(role == "current" or layer in trainable_transforms)
            if layer.binarize_inputs:
                used_input_quantizers.add(id(layer.input_quantizer))
        for layer, _ in roles:  # unused quantizer parameters would stall DDP's gradient reduction
            if layer.input_quantizer is not None:
                layer.input_quantizer.requires_grad_(id(layer.input_quantizer) in used_input_quantizers)

    def _block_transform_layers(self, model: nn.Module, roles: list[tuple[BinaryConv2d, str]]) -> set:
        if self.block_transforms == "frozen" or self.index is None:
            return set()
        role = {id(layer): r for layer, r in roles}
        chosen = set()
        for group in units(model, "block"):
            if any(role[id(layer)] == "current" for layer in group):
                chosen.update(layer for layer in group if role[id(layer)] == "frozen")
        return chosen


def set_threshold(rsign: RSign, threshold: torch.Tensor) -> None:
    """Make `rsign` compute sign(x - threshold) per channel (its learnable shift is -threshold)."""
    with torch.no_grad():
        rsign.shift.bias.copy_(-threshold.reshape(rsign.shift.bias.shape))


class _StopForward(Exception):
    """Raised by the last calibration hook: nothing above the layers being calibrated needs to run."""


class Calibrate:
    """Stage `calibrate` hook for the layers that become current in this stage, from their inputs with the modes
    this stage set (lower layers binary):
    - RSign thresholds at the channel mean of the layer's real input (first calibration batch) [ours]: the fp
      layout feeds every binary conv a ReLU output, which sign(x + 0) would map to all +1;
    - with `transform`, V and s from a PCA of the input as the conv sees it (binarized, with that threshold);
      at most `rows_per_batch` random input vectors per layer and batch, centred or not per
      `QuantizerOptions.centered`.
    Runs the model in train mode (BN batch statistics, as training will see) and restores BN buffers."""

    def __init__(self, modes: SetModes, rows_per_batch: int = 8192, seed: int = 0, transform: bool = True) -> None:
        self.modes, self.rows_per_batch, self.seed, self.transform = modes, rows_per_batch, seed, transform
        _named(self, f"bitat.schedule.Calibrate(stage={modes.index}, steps={modes.steps}, unit={modes.unit!r}, "
                     f"rows_per_batch={rows_per_batch}, seed={seed}, thresholds='mean', transform={transform})")

    def new_layers(self, model: nn.Module) -> list[BinaryConv2d]:
        """The layers this stage initialises (threshold, transform): current now and not current in the stage before."""
        now = [layer for layer, role in self.modes.roles(model) if role == "current"]
        before: set[int] = set()
        if self.modes.index:
            prev = SetModes(self.modes.index - 1, self.modes.steps, self.modes.unit)
            before = {id(layer) for layer, role in prev.roles(model) if role == "current"}
        return [layer for layer in now if id(layer) not in before]

    @torch.no_grad()
    def __call__(self, model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        layers = self.new_layers(model)
        if not layers:
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + (self.modes.index or 0))
        transformed = [layer for layer in layers
                       if self.transform and isinstance(layer.weight_quantizer, ImportanceAwareSign)]
        accumulators = {}
        for layer in transformed:
            batch, n = statistic_shape(layer, layer.weight_quantizer.mode)
            accumulators[id(layer)] = CovarianceAccumulator(n, batch, self.rows_per_batch, generator)
        unset = {id(layer) for layer in layers if layer.binarize_inputs and isinstance(layer.input_quantizer, RSign)}
        last = layers[-1]

        def capture(layer: BinaryConv2d, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0]
            if id(layer) in unset:  # set before this batch's sign, so upper layers see the new threshold
                set_threshold(layer.input_quantizer, x.float().mean(dim=(0, 2, 3)))
                unset.discard(id(layer))
            if layer.binarize_inputs:
                x = layer.input_quantizer(x)
            if id(layer) in accumulators:
                accumulators[id(layer)].update(statistic_rows(layer, x.float(), layer.weight_quantizer.mode))
            if layer is last:
                raise _StopForward

        handles = [layer.register_forward_pre_hook(capture) for layer in layers]
        was_training = model.training
        saved = {name: buf.clone() for name, buf in model.named_buffers() if not name.endswith(".base")}
        model.train()
        try:
            for images, _ in batches:
                try:
                    model(images)
                except _StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
            for name, buf in model.named_buffers():
                if name in saved:
                    buf.copy_(saved[name])
            model.train(was_training)
        for layer in transformed:
            cov = accumulators[id(layer)].covariance(layer.weight_quantizer.options.centered)
            layer.weight_quantizer.bitat_transform.init_from_covariance(cov)
