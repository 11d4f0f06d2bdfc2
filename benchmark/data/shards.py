"""Write a Source as byte-reproducible WebDataset shards plus manifest.json and timm's _info.json, atomically.

Splits: `train` and `val` (a seeded hold-out of the official train split, for model selection) and `test` (the
official test/val split). Each sample is `{__key__: <split>_<original index, 7 digits>, cls: label, png|jpg}`;
samples are in original-index order, shards are uncompressed tars with mtime 0 and fixed owner, PNGs come from
Pillow with fixed settings, so the same inputs (and zlib) give byte-identical files and stable DVC hashes.
Everything is written to a hidden folder next to `out` and renamed into place at the end.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from benchmark.data.manifest import FORMAT, FORMAT_VERSION, INFO_NAME, MANIFEST_NAME, sha256_file
from benchmark.data.sources import Source, SplitData
from benchmark.errors import BitbenchError

# 10,000 samples a shard: Fashion-MNIST/CIFAR train get 5-6 shards, ImageNet ~1 GB shards. Streaming readers
# (webdataset, timm) need #shards ≥ ranks × workers; benchmark.data.ShardLoader reads by random access and does not.
DEFAULT_SHARD_SIZE = 10_000
KEY_DIGITS = 7  # ImageNet train has 1,281,167 images
STATS_MAX_FILES = 10_000  # mean/std of file-based (JPEG) sources: a seeded sample of the train split


def sample_key(split: str, original_index: int) -> str:
    """`<split>_<index>`: dot-free (webdataset splits key and extension at the first dot)."""
    return f"{split}_{original_index:0{KEY_DIGITS}d}"


def encode_png(image: np.ndarray) -> bytes:
    """Lossless, deterministic PNG of a uint8 H×W×C image (C=1 stays grayscale)."""
    from PIL import Image

    pil = Image.fromarray(image[:, :, 0], "L") if image.shape[2] == 1 else Image.fromarray(image, "RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=6, optimize=False)
    return buffer.getvalue()


def split_train_val(n_train: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the official train split kept for `train` and held out for `val`: a seeded, sorted partition."""
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


ENCODE_WORKERS = 2
_POOL_IMAGES: np.ndarray | None = None  # the images the encoding pool's forked workers inherit


def _encode_rows(rows: np.ndarray) -> list[bytes]:
    return [encode_png(_POOL_IMAGES[row]) for row in rows]


def _payloads(split: SplitData, rows: np.ndarray, chunk: int = 500) -> Iterator[bytes]:
    """The stored bytes of each row, in order: original files as they are, or PNGs encoded by a small forked
    pool (Pool.imap keeps the order) while this process writes the tars."""
    global _POOL_IMAGES
    if split.images is None:
        for row in rows:
            try:
                yield split.files[row].read_bytes()
            except OSError as err:
                raise BitbenchError(f"cannot read {split.files[row]}: {err}") from None
        return
    if (os.cpu_count() or 1) < 2 or len(rows) < 4 * chunk:
        yield from (encode_png(split.images[row]) for row in rows)
        return
    import multiprocessing

    _POOL_IMAGES = split.images
    pool = multiprocessing.get_context("fork").Pool(ENCODE_WORKERS)
    try:
        for encoded in pool.imap(_encode_rows, [rows[i:i + chunk] for i in range(0, len(rows), chunk)]):
            yield from encoded
    finally:
        pool.terminate()
        _POOL_IMAGES = None


def _write_split(name: str, data: SplitData, rows: np.ndarray, ext: str, folder: Path, shard_size: int,
                 progress) -> dict:
    import webdataset as wds

    shards = []
    payloads = _payloads(data, rows)
    for start in range(0, len(rows), shard_size):
        chunk = rows[start:start + shard_size]
        path = folder / f"{name}-{len(shards):06d}.tar"
        # mtime=0 and a fixed owner/mode: byte-reproducible; encoder=False: we hand over finished bytes.
        with wds.TarWriter(str(path), encoder=False, mtime=0, compress=False) as writer:
            for row, payload in zip(chunk, payloads):  # noqa: B905 (payloads run on)
                writer.write({"__key__": sample_key(name, int(data.index[row])),
                              "cls": str(int(data.labels[row])).encode(), ext: payload})
                progress.update(1)
        shards.append({"name": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size,
                       "samples": len(chunk)})
    payloads.close()
    return {"count": int(len(rows)), "shards": shards}


def _array_stats(images: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Exact per-channel mean/std in [0, 1] units (integer sums, so the result does not depend on chunking)."""
    channels = images.shape[-1]
    s1 = np.zeros(channels, dtype=np.uint64)
    s2 = np.zeros(channels, dtype=np.uint64)
    for start in range(0, len(rows), chunk):
        block = images[rows[start:start + chunk]].reshape(-1, channels).astype(np.uint64)
        s1 += block.sum(axis=0)
        s2 += (block * block).sum(axis=0)
    n = len(rows) * int(np.prod(images.shape[1:-1]))
    mean = s1.astype(np.float64) / (n * 255.0)
    var = s2.astype(np.float64) / (n * 255.0 ** 2) - mean ** 2
    return [float(m) for m in mean], [float(s) for s in np.sqrt(np.maximum(var, 0.0))]


def _file_stats(files: list[Path], rows: np.ndarray, seed: int) -> tuple[list[float], list[float], int]:
    from PIL import Image

    if len(rows) > STATS_MAX_FILES:
        rows = np.sort(np.random.default_rng(seed).choice(rows, STATS_MAX_FILES, replace=False))
    s1, s2, n = np.zeros(3), np.zeros(3), 0
    for row in rows:
        try:
            with Image.open(files[row]) as img:
                pixels = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        except OSError as err:
            raise BitbenchError(f"cannot decode {files[row]}: {err}") from None
        s1 += pixels.sum(axis=0)
        s2 += (pixels * pixels).sum(axis=0)
        n += len(pixels)
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
    return [float(m) for m in mean], [float(s) for s in std], len(rows)


def _timm_info(source: Source, splits: dict) -> dict:
    """timm's reader_wds `_info.json`: per split its sample count, shard file names and shard lengths."""
    return {"name": source.dataset, "num_classes": len(source.classes),
            "splits": {name: {"name": name, "num_samples": split["count"],
                              "filenames": [s["name"] for s in split["shards"]],
                              "shard_lengths": [s["samples"] for s in split["shards"]]}
                       for name, split in splits.items()}}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def check_output_folder(out: Path) -> None:
    """`out` may be new, empty, or an earlier dataset (it has a manifest.json); anything else is not ours to replace."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise BitbenchError(f"--out {out} exists and is not a bitbench dataset (no {MANIFEST_NAME}); "
                            f"remove it or pick another folder")


def _replace_folder(new: Path, out: Path) -> None:
    """Swap `new` in as `out`: two renames, so `out` is at every moment either the old dataset or the new one
    (or briefly absent); never a half-written folder."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
        os.rename(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, out)


def write_dataset(source: Source, out: str | os.PathLike, *, val_size: int, seed: int = 0,
                  shard_size: int = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict:
    """Write `source` as shards + manifest into `out` (replacing an earlier dataset there); return the manifest."""
    from tqdm import tqdm

    out = Path(out).expanduser().absolute()
    n_train = len(source.train)
    if shard_size < 1:
        raise BitbenchError(f"--shard-size must be at least 1, got {shard_size}")
    if not 0 <= val_size < n_train:
        raise BitbenchError(f"--val-size must be between 0 and {n_train - 1} "
                            f"(the official train split has {n_train} images), got {val_size}")
    check_output_folder(out)
    train_rows, val_rows = split_train_val(n_train, val_size, seed)
    plan = {"train": (source.train, train_rows, "train"), "val": (source.train, val_rows, "train"),
            "test": (source.test, np.arange(len(source.test)), "test")}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        total = sum(len(rows) for _, rows, _ in plan.values())
        splits = {}
        with tqdm(total=total, desc=f"prepare {source.dataset}", unit="img", disable=not progress,
                  mininterval=0.5) as bar:
            for name, (data, rows, origin) in plan.items():
                splits[name] = {"from": origin, **_write_split(name, data, rows, source.image_ext, tmp,
                                                                shard_size, bar)}
        if source.train.images is not None:
            mean, std = _array_stats(source.train.images, train_rows)
            stats_images = len(train_rows)
        else:
            mean, std, stats_images = _file_stats(source.train.files, train_rows, seed)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dataset": source.dataset, "family": source.family,
            "source": source.description, "seed": seed, "val_size": val_size, "shard_size": shard_size,
            "num_classes": len(source.classes), "classes": source.classes, "channels": source.channels,
            "image_ext": source.image_ext, "image_size": source.image_size,
            "stored_size": None if source.stored_size is None else list(source.stored_size),
            "mean": mean, "std": std, "stats": {"split": "train", "images": stats_images, "units": "[0, 1]"},
            "key": f"<split>_<index in the official split, {KEY_DIGITS} digits>", "splits": splits,
        }
        _write_json(tmp / INFO_NAME, _timm_info(source, splits))
        _write_json(tmp / MANIFEST_NAME, manifest)  # last: a folder with a manifest is complete
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest

