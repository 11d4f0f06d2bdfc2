"""Per-dataset batch transforms of decoded uint8 images, with all randomness drawn from an explicit generator.

Train: Fashion-MNIST pad 2 + random crop; CIFAR pad 4 + random crop + horizontal flip; ImageNet RandomResizedCrop
(scale 0.08-1, ratio 3/4-4/3) + flip. Eval: ImageNet resize to size/0.875 + center crop, others unchanged.
An explicit `numpy.random.Generator` (instead of torch's global RNG) makes augmentation reproducible from the
reader's (seed, epoch, rank, batch) whatever the worker count, and never disturbs the training process's RNG.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf

BatchTransform = Callable[[Sequence[torch.Tensor], "np.random.Generator | None"], torch.Tensor]
EVAL_CROP_FRACTION = 0.875  # 224 of 256


def _functional():
    """torchvision's v2 functional ops, imported on first use (torchvision costs seconds to import and the
    fixed-size datasets at their own size never need it)."""
    from torchvision.transforms.v2 import functional

    return functional


def _fit(batch: torch.Tensor, size: int) -> torch.Tensor:
    if batch.shape[-1] == size and batch.shape[-2] == size:
        return batch
    return _functional().resize(batch, [size, size], antialias=True)


def _flip(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    flips = torch.from_numpy(rng.random(len(batch)) < 0.5)
    batch[flips] = batch[flips].flip(-1)
    return batch


class PadCrop:
    """Zero-pad by `pad`, crop back to the original size at a random offset, optionally flip; then fit to `size`."""

    def __init__(self, pad: int, flip: bool, size: int):
        self.pad, self.flip, self.size = pad, flip, size

    def __call__(self, images: Sequence[torch.Tensor], rng: np.random.Generator) -> torch.Tensor:
        batch = torch.stack(list(images))
        h, w = batch.shape[-2:]
        padded = nnf.pad(batch, (self.pad,) * 4)
        offsets = rng.integers(0, 2 * self.pad + 1, size=(len(batch), 2))
        out = torch.empty_like(batch)
        for i, (top, left) in enumerate(offsets.tolist()):
            out[i] = padded[i, :, top:top + h, left:left + w]
        if self.flip:
            out = _flip(out, rng)
        return _fit(out, self.size)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a random fraction `scale` of the area with aspect ratio in `ratio`
    (log-uniform); after 10 misses, the largest central crop within `ratio` (Inception-style sampling)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCrop:
    """ImageNet training crop: random area/aspect box resized to `size`×`size`, then a random horizontal flip."""

    def __init__(self, size: int, flip: bool = True):
        self.size, self.flip = size, flip

    def __call__(self, images: Sequence[torch.Tensor], rng: np.random.Generator) -> torch.Tensor:
        F = _functional()
        crops = []
        for image in images:
            top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], rng)
            crops.append(F.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True))
        batch = torch.stack(crops)
        return _flip(batch, rng) if self.flip else batch


class ResizeCenterCrop:
    """ImageNet evaluation: shorter side to size/0.875 (256 for 224), then the central size×size crop."""

    def __init__(self, size: int):
        self.size, self.resize = size, int(round(size / EVAL_CROP_FRACTION))

    def __call__(self, images: Sequence[torch.Tensor], rng: np.random.Generator | None = None) -> torch.Tensor:
        F = _functional()
        return torch.stack([F.center_crop(F.resize(image, self.resize, antialias=True), [self.size, self.size])
                            for image in images])


class Fit:
    """Evaluation of fixed-size datasets: the images as stored, resized only when `size` differs."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, images: Sequence[torch.Tensor], rng: np.random.Generator | None = None) -> torch.Tensor:
        return _fit(torch.stack(list(images)), self.size)


def build_transform(family: str, train: bool, image_size: int) -> BatchTransform:
    """The batch transform of a dataset family ('mnist', 'cifar', 'imagenet') for training or evaluation."""
    if family == "imagenet":
        return RandomResizedCrop(image_size) if train else ResizeCenterCrop(image_size)
    if family == "mnist":
        return PadCrop(pad=2, flip=False, size=image_size) if train else Fit(image_size)
    if family == "cifar":
        return PadCrop(pad=4, flip=True, size=image_size) if train else Fit(image_size)
    raise ValueError(f"unknown dataset family '{family}' (mnist, cifar, imagenet)")


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N×C×H×W → float32 in [0, 1], minus the per-channel mean, over the std."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return batch.float().div_(255.0).sub_(mean_t).div_(std_t)
