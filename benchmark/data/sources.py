"""Per-dataset source readers: an official dataset copy → labelled images of its official train and test splits.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package, CIFAR from torchvision's own dataset classes
(a local copy or a download), ImageNet from an ILSVRC2012 folder. Decoded datasets hand over uint8 arrays (the
shard writer stores them as lossless PNG); ImageNet hands over its JPEG files, stored byte for byte.
"""
from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmark.errors import BitbenchError

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagenet")
DEFAULT_VAL_SIZE = {"fashion-mnist": 5000, "cifar10": 5000, "cifar100": 5000, "imagenet": 10000}

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
# Where the Debian package puts its files; BITBENCH_FASHION_MNIST_DIR points elsewhere (a copy, or a test).
FASHION_MNIST_DIR = Path(os.environ.get("BITBENCH_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
IMAGENET_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
IMAGENET_META = "meta.mat"
IMAGENET_DEVKIT_DATA = Path("ILSVRC2012_devkit_t12") / "data"
_WNID = re.compile(r"^n\d{8}$")
_VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.jpe?g$", re.IGNORECASE)
_JPEG_SUFFIXES = (".jpeg", ".jpg")


@dataclass
class SplitData:
    """One official split: labels, the original index of each row, and the images either decoded
    (`images`, uint8 N×H×W×C) or as files whose bytes are stored unchanged (`files`)."""

    labels: np.ndarray
    index: np.ndarray
    images: np.ndarray | None = None
    files: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Source:
    """A dataset ready to shard: classes, image format and its two official splits."""

    dataset: str
    family: str  # mnist | cifar | imagenet: picks the transforms and recipes
    classes: list[str]
    channels: int
    image_ext: str  # png (decoded sources, lossless) | jpg (original bytes)
    image_size: int  # the side length models take
    stored_size: tuple[int, int] | None  # None: images keep their own sizes
    train: SplitData
    test: SplitData
    description: dict = field(default_factory=dict)


def load_source(dataset: str, source: str | os.PathLike | None = None, download: bool = False) -> Source:
    """Read `dataset` from `source` (or its default place); BitbenchError on a bad name, path or layout."""
    if dataset not in DATASETS:
        raise BitbenchError(f"unknown dataset '{dataset}'; valid: {', '.join(DATASETS)}")
    path = None if source is None else Path(source).expanduser()
    if path is not None and not download and not path.is_dir():
        raise BitbenchError(f"source folder {path} does not exist")
    if dataset == "fashion-mnist":
        return fashion_mnist(path)
    if dataset in ("cifar10", "cifar100"):
        return cifar(dataset, path, download)
    if download:
        raise BitbenchError("imagenet cannot be downloaded: pass --source with an ILSVRC2012 folder")
    if path is None:
        raise BitbenchError("imagenet needs --source DIR (an ILSVRC2012 folder with train/ and val/)")
    return imagenet(path)


# ---------------------------------------------------------------- Fashion-MNIST (Debian package, torchvision reader)

def _debian_version(package: str) -> str | None:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                             capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def _find_idx_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def torchvision_fashion_mnist(train: bool, source: Path | None = None, transform=None):
    """torchvision.datasets.FashionMNIST over the Debian package's idx files (or `source`): the files are unpacked
    into the FashionMNIST/raw/ layout torchvision expects in a temporary folder (download stays off); the
    dataset holds its data in memory, so the folder goes away once it is built."""
    folder = FASHION_MNIST_DIR if source is None else source
    found = {name: _find_idx_file(folder, name) for name in FASHION_MNIST_FILES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        if source is None:
            raise BitbenchError(f"Fashion-MNIST files not found in {folder}: "
                                f"apt-get install {FASHION_MNIST_PACKAGE}")
        raise BitbenchError(f"source folder {folder} lacks the Fashion-MNIST file {missing[0]}(.gz)")
    import torchvision

    with tempfile.TemporaryDirectory(prefix="bitbench-fmnist-") as root:
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for name, path in found.items():
            opener = gzip.open if path.suffix == ".gz" else open
            try:
                with opener(path, "rb") as src, open(raw / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as err:
                raise BitbenchError(f"cannot read {path}: {err}") from None
        try:
            return torchvision.datasets.FashionMNIST(root, train=train, download=False, transform=transform)
        except (RuntimeError, ValueError, TypeError) as err:
            raise BitbenchError(f"torchvision cannot read Fashion-MNIST from {folder}: {err}") from None


def fashion_mnist(source: Path | None = None) -> Source:
    """Fashion-MNIST from Debian's package (or `source`), read by torchvision.datasets.FashionMNIST."""
    splits = [torchvision_fashion_mnist(train, source) for train in (True, False)]
    train, test = (SplitData(labels=ds.targets.numpy().astype(np.int64), index=np.arange(len(ds)),
                             images=ds.data.numpy()[..., None]) for ds in splits)
    folder = FASHION_MNIST_DIR if source is None else source
    description = {"kind": "debian" if source is None else "folder", "path": str(folder),
                   "reader": "torchvision.datasets.FashionMNIST"}
    if source is None:
        description.update(package=FASHION_MNIST_PACKAGE, version=_debian_version(FASHION_MNIST_PACKAGE))
    return Source("fashion-mnist", "mnist", list(splits[0].classes), channels=1, image_ext="png", image_size=28,
                  stored_size=(28, 28), train=train, test=test, description=description)


# ---------------------------------------------------------------- CIFAR-10/100 (torchvision)

def cifar(dataset: str, source: Path | None, download: bool) -> Source:
    """CIFAR through torchvision.datasets.CIFAR10/100: from `source` (torchvision's layout) or downloaded."""
    folder = CIFAR_FOLDERS[dataset]  # torchvision's base_folder, checked before the slow torchvision import
    if source is None and not download:
        raise BitbenchError(f"{dataset} needs --source DIR (a folder holding {folder}/) or --download")
    if source is not None and source.name == folder:
        source = source.parent  # accept the batches folder itself
    if source is not None and not download and not (source / folder).is_dir():
        raise BitbenchError(f"source folder {source} has no {folder}/ (torchvision's {dataset.upper()} layout)")
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    with tempfile.TemporaryDirectory(prefix=f"bitbench-{dataset}-") as scratch:
        root = source if source is not None else Path(scratch)  # a download without --source is not kept
        try:
            splits = [cls(str(root), train=train, download=download) for train in (True, False)]
        except RuntimeError as err:
            raise BitbenchError(f"torchvision cannot read {dataset} from {root}: {err}") from None
        except OSError as err:  # URLError is an OSError
            raise BitbenchError(f"could not download {dataset} from {cls.url} ({err}); "
                                f"pass --source with a local copy") from None
    train, test = (SplitData(labels=np.asarray(ds.targets, dtype=np.int64), index=np.arange(len(ds)),
                             images=np.ascontiguousarray(ds.data)) for ds in splits)
    description = {"kind": "torchvision", "reader": f"torchvision.datasets.{cls.__name__}",
                   "path": None if source is None else str(source)}
    if download:
        description["url"] = cls.url
    return Source(dataset, "cifar", list(splits[0].classes), channels=3, image_ext="png", image_size=32,
                  stored_size=(32, 32), train=train, test=test, description=description)


# ---------------------------------------------------------------- ImageNet (ILSVRC2012 folder)

def _jpegs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _JPEG_SUFFIXES)


def _find_devkit_file(source: Path, name: str) -> Path | None:
    for folder in (source, source / IMAGENET_DEVKIT_DATA):
        if (folder / name).is_file():
            return folder / name
    return None


def _ilsvrc_id_to_wnid(meta: Path) -> dict[int, str]:
    """The devkit's meta.mat: ILSVRC2012_ID (what the ground-truth file lists) → wnid, for the 1,000 leaf classes."""
    try:
        import scipy.io
    except ImportError:
        raise BitbenchError(f"reading {meta} needs scipy (pip install scipy), "
                            f"or lay val/ out as val/<wnid>/ folders") from None
    try:
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in np.atleast_1d(synsets)
                if int(s["num_children"]) == 0}
    except Exception as err:  # a wrong file: scipy raises many kinds
        raise BitbenchError(f"cannot read the synsets of {meta}: {err}") from None


def imagenet(source: Path) -> Source:
    """ILSVRC2012: SOURCE/train/<wnid>/*.JPEG, and SOURCE/val/ as either <wnid>/ folders or the flat
    ILSVRC2012_val_########.JPEG files labelled by ILSVRC2012_validation_ground_truth.txt plus meta.mat,
    looked up in SOURCE/ and then SOURCE/ILSVRC2012_devkit_t12/data/. Class index = sorted wnid order."""
    train_dir, val_dir = source / "train", source / "val"
    if not train_dir.is_dir() or not val_dir.is_dir():
        raise BitbenchError(f"{source} is not an ILSVRC2012 folder: expected train/<wnid>/*.JPEG and val/")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    bad = [w for w in wnids if not _WNID.match(w)]
    if not wnids or bad:
        raise BitbenchError(f"{train_dir} must hold only <wnid>/ class folders such as n01440764/"
                            + (f", found {bad[0]}/" if bad else ", found none"))
    class_of = {w: i for i, w in enumerate(wnids)}
    train_files, train_labels = [], []
    for wnid in wnids:
        files = _jpegs(train_dir / wnid)
        if not files:
            raise BitbenchError(f"class folder {train_dir / wnid} holds no .JPEG files")
        train_files += files
        train_labels += [class_of[wnid]] * len(files)

    val_folders = sorted(p for p in val_dir.iterdir() if p.is_dir())
    if val_folders:
        layout, val_files, val_labels = "folders", [], []
        for folder in val_folders:
            if folder.name not in class_of:
                raise BitbenchError(f"{folder} is not a class of train/ (val/<wnid>/ must use train's wnids)")
            files = _jpegs(folder)
            val_files += files
            val_labels += [class_of[folder.name]] * len(files)
    else:
        layout, val_files = "flat", _jpegs(val_dir)
        gt_path = _find_devkit_file(source, IMAGENET_GROUND_TRUTH)
        meta_path = _find_devkit_file(source, IMAGENET_META)
        if gt_path is None or meta_path is None:
            missing = IMAGENET_GROUND_TRUTH if gt_path is None else IMAGENET_META
            raise BitbenchError(f"flat {val_dir} needs the devkit's {missing} in {source} or "
                                f"{source / IMAGENET_DEVKIT_DATA} (or val/<wnid>/ folders)")
        ground_truth = [int(line) for line in gt_path.read_text().split()]
        id_to_wnid = _ilsvrc_id_to_wnid(meta_path)
        val_labels = []
        for path in val_files:
            match = _VAL_NAME.match(path.name)
            if match is None:
                raise BitbenchError(f"{path} is not named ILSVRC2012_val_########.JPEG, so it has no ground truth")
            number = int(match.group(1))
            if not 1 <= number <= len(ground_truth):
                raise BitbenchError(f"{gt_path} has no line {number} for {path.name}")
            wnid = id_to_wnid.get(ground_truth[number - 1])
            if wnid not in class_of:
                raise BitbenchError(f"{path.name} belongs to {wnid}, which is not a class of {train_dir}")
            val_labels.append(class_of[wnid])
    if not val_files:
        raise BitbenchError(f"{val_dir} holds no .JPEG files")
    # Original index of a val image: its ILSVRC2012 number - 1 when named so (both layouts then agree).
    numbers = [_VAL_NAME.match(p.name) for p in val_files]
    if all(numbers):
        val_index = np.array([int(m.group(1)) - 1 for m in numbers], dtype=np.int64)
    else:
        val_index = np.arange(len(val_files), dtype=np.int64)
    order = np.argsort(val_index, kind="stable")
    if len(np.unique(val_index)) != len(val_index):
        raise BitbenchError(f"{val_dir} holds the same ILSVRC2012_val number twice")
    test = SplitData(labels=np.asarray(val_labels, dtype=np.int64)[order], index=val_index[order],
                     files=[val_files[i] for i in order])
    train = SplitData(labels=np.asarray(train_labels, dtype=np.int64), index=np.arange(len(train_files)),
                      files=train_files)
    description = {"kind": "ilsvrc2012-folder", "path": str(source), "val_layout": layout}
    return Source("imagenet", "imagenet", wnids, channels=3, image_ext="jpg", image_size=224, stored_size=None,
                  train=train, test=test, description=description)
