"""The shard reader training uses: random access into WebDataset tars, split exactly across DDP ranks.

Design. On construction the loader checks the shards against the manifest (sizes by default), then indexes
them once per process: one pass over the 512-byte ustar headers (each checksum-checked) records, per sample,
its shard, the byte range of its image and its label. Samples are then read with `pread` by position, as
torchvision's ImageFolder reads files, so any sample order costs the same and no shuffle buffer is needed;
the OS page cache holds the small datasets after the first epoch.

Splitting. A training epoch is a permutation of the whole split seeded by (seed, epoch), truncated to a
multiple of world_size × batch_size; rank r takes the r-th contiguous slice and cuts it into batches. Every
rank therefore gets the same number of full batches (unequal counts hang DDP's collectives), ranks see
disjoint samples, and each epoch reshuffles reproducibly. The incomplete tail (< world_size × batch_size
samples) is dropped, reshuffled into the next epoch. Evaluation (train=False) gives rank r the r-th contiguous
share of the split in shard order, every sample exactly once, the last batch possibly short. Because samples
are dealt out one by one, not shard by shard, the reader works with any number of shards per rank or worker.

Workers. Each DataLoader worker builds whole batches (index `b` of this rank's plan): reads, decodes (Pillow;
PNG is lossless, so pixels equal the source's), augments with a generator seeded by (seed, epoch, rank, b)
— hence identical batches whatever the worker count — and normalises with the manifest's mean/std.
A sample that does not decode stops the epoch with a BitbenchError naming its shard and key.
"""
from __future__ import annotations

import io
import math
import mmap
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmark.data.manifest import load_manifest, shard_paths
from benchmark.data.transforms import build_transform, normalize
from benchmark.errors import BitbenchError

_BLOCK = 512
_END = bytes(_BLOCK)


@dataclass
class SplitIndex:
    """Where each sample of a split lives: shard number, image byte offset and size, label and key."""

    paths: list[str]
    shard: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray
    keys: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _parse_header(header: bytes, pos: int, path: Path) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar header block, its checksum checked (what tarfile.TarInfo.frombuf
    does, at a fraction of the cost: the index reads two headers per sample)."""
    try:
        stored = int(header[148:156].strip(b"\0 ") or b"-1", 8)
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        stored = size = -1
    if stored != sum(header) - sum(header[148:156]) + 256 or size < 0 or header[257:262] != b"ustar":
        raise BitbenchError(f"shard {path} is corrupt at byte {pos}: not a valid ustar header")
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, header[156:157]


def index_shard(path: Path, image_ext: str) -> tuple[list[str], list[int], list[int], list[int]]:
    """Keys, image offsets, image sizes and labels of one tar shard, from its headers; corrupt → BitbenchError."""
    keys, offsets, sizes, labels = [], [], [], []
    size = path.stat().st_size
    pending: dict[str, int] = {}

    def finish(key: str) -> None:
        if "cls" not in pending or "offset" not in pending:
            missing = "cls" if "cls" not in pending else image_ext
            raise BitbenchError(f"sample {key} in shard {path} has no {missing} entry")
        keys.append(key)
        offsets.append(pending["offset"])
        sizes.append(pending["size"])
        labels.append(pending["cls"])

    current = None
    with open(path, "rb") as f, (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else io.BytesIO()) as mm:
        pos, ended = 0, False
        while pos + _BLOCK <= size:
            header = mm[pos:pos + _BLOCK]
            if header == _END:
                ended = True
                break
            name, length, kind = _parse_header(header, pos, path)
            data_at = pos + _BLOCK
            pos = data_at + -(-length // _BLOCK) * _BLOCK
            if data_at + length > size:
                break
            if kind not in (b"0", b"\0"):
                raise BitbenchError(f"shard {path} holds an unexpected tar entry {name!r} (not a regular file)")
            key, _, field = name.partition(".")
            if key != current:
                if current is not None:
                    finish(current)
                current, pending = key, {}
            if field == "cls":
                try:
                    pending["cls"] = int(mm[data_at:data_at + length])
                except ValueError:
                    raise BitbenchError(f"sample {key} in shard {path} has a corrupt cls entry") from None
            elif field == image_ext:
                pending["offset"], pending["size"] = data_at, length
        if not ended:
            raise BitbenchError(f"shard {path} is truncated (it ends before the tar end marker)")
        if current is not None:
            finish(current)
    return keys, offsets, sizes, labels


_INDEX_CACHE: dict[tuple, tuple] = {}


def index_split(manifest: dict, data_dir: str | os.PathLike, split: str) -> SplitIndex:
    """Index every shard of `split` (cached per process by path, size and mtime); checks counts against the manifest."""
    paths = shard_paths(manifest, data_dir, split)
    parts = []
    for number, (path, entry) in enumerate(zip(paths, manifest["splits"][split]["shards"], strict=True)):
        stat = path.stat()
        cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, manifest["image_ext"])
        if cache_key not in _INDEX_CACHE:
            _INDEX_CACHE[cache_key] = index_shard(path, manifest["image_ext"])
        keys, offsets, sizes, labels = _INDEX_CACHE[cache_key]
        if len(keys) != entry["samples"]:
            raise BitbenchError(f"shard {path} holds {len(keys)} samples, the manifest says {entry['samples']}")
        parts.append((number, keys, offsets, sizes, labels))
    keys = [k for part in parts for k in part[1]]
    if len(set(keys)) != len(keys):
        raise BitbenchError(f"split '{split}' of {data_dir} holds the same key twice")
    return SplitIndex(
        paths=[str(p) for p in paths],
        shard=np.concatenate([np.full(len(p[1]), p[0], dtype=np.int32) for p in parts] or [np.zeros(0, np.int32)]),
        offsets=np.array([o for p in parts for o in p[2]], dtype=np.int64),
        sizes=np.array([s for p in parts for s in p[3]], dtype=np.int64),
        labels=np.array([c for p in parts for c in p[4]], dtype=np.int64),
        keys=keys)


class _Files:
    """Shard file descriptors, opened lazily by whichever process reads (so they are never shared across a fork)."""

    def __init__(self, paths: list[str]):
        self.paths, self.fds, self.pid = paths, {}, None

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():
            self.fds, self.pid = {}, os.getpid()
        fd = self.fds.get(shard)
        if fd is None:
            fd = self.fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise BitbenchError(f"shard {self.paths[shard]} is shorter than its index (changed while reading?)")
        return data

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "fds": {}, "pid": None}

    def __del__(self) -> None:
        if self.pid == os.getpid():
            for fd in self.fds.values():
                os.close(fd)


def decode_image(data: bytes, channels: int) -> torch.Tensor:
    """PNG/JPEG bytes → uint8 C×H×W tensor with `channels` channels (1: grayscale, 3: RGB)."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.array(image if image.mode == mode else image.convert(mode))
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _read_sample(index: SplitIndex, files: _Files, row: int, channels: int) -> torch.Tensor:
    data = files.read(int(index.shard[row]), int(index.offsets[row]), int(index.sizes[row]))
    try:
        return decode_image(data, channels)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... for broken data
        shard = Path(index.paths[index.shard[row]]).name
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BitbenchError(f"image {index.keys[row]} in shard {shard} does not decode: {reason}") from None


def iter_samples(data_dir: str | os.PathLike, split: str,
                 verify: str = "fast") -> Iterator[tuple[str, torch.Tensor, int]]:
    """Every sample of `split` in shard order as (key, uint8 C×H×W image, label): no transform, no normalisation."""
    manifest = load_manifest(data_dir, verify=verify)
    index = index_split(manifest, data_dir, split)
    files = _Files(index.paths)
    for row in range(len(index)):
        yield index.keys[row], _read_sample(index, files, row, manifest["channels"]), int(index.labels[row])


class _Batches(torch.utils.data.Dataset):
    """Batch `b` of one rank's epoch plan, built whole inside a DataLoader worker."""

    def __init__(self, index: SplitIndex, plan: list[np.ndarray], manifest: dict, transform, seed_parts: tuple | None,
                 return_index: bool):
        self.index, self.plan, self.transform = index, plan, transform
        self.files = _Files(index.paths)
        self.channels, self.mean, self.std = manifest["channels"], manifest["mean"], manifest["std"]
        self.seed_parts, self.return_index = seed_parts, return_index

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int):
        rows = self.plan[b]
        try:
            images = [_read_sample(self.index, self.files, int(row), self.channels) for row in rows]
        except BitbenchError as err:  # handed back as data: a one-line error, not a worker traceback
            return {"error": str(err)}
        rng = None if self.seed_parts is None else np.random.default_rng([*self.seed_parts, b])
        batch = normalize(self.transform(images, rng), self.mean, self.std)
        labels = torch.from_numpy(self.index.labels[rows])
        if self.return_index:
            return batch, labels, torch.from_numpy(rows.astype(np.int64))
        return batch, labels


class ShardLoader:
    """Batches `(images float32 N×C×H×W normalised, labels int64)` of one split for one DDP rank.

    `train=True`: seeded reshuffle every epoch (call `set_epoch`), augmentation, full batches only, the same
    `len()` on every rank. `train=False`: this rank's contiguous share in order, no augmentation.
    `max_batches` caps the batches per epoch; `image_size` defaults to the manifest's; `return_index` adds
    a third item, the rows of the batch in the split (see `keys`)."""

    def __init__(self, data_dir: str | os.PathLike, split: str, batch_size: int, *, train: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 2, max_batches: int | None = None,
                 image_size: int | None = None, verify: str = "fast", return_index: bool = False,
                 pin_memory: bool | None = None):
        if batch_size < 1:
            raise BitbenchError(f"batch size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise BitbenchError(f"rank {rank} is not within world size {world_size}")
        if num_workers < 0 or (max_batches is not None and max_batches < 0):
            raise BitbenchError("num_workers and max_batches must not be negative")
        self.data_dir, self.split, self.batch_size, self.train = Path(data_dir), split, batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.max_batches, self.return_index = num_workers, max_batches, return_index
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.manifest = load_manifest(data_dir, verify=verify)
        self.index = index_split(self.manifest, data_dir, split)
        self.image_size = image_size or self.manifest["image_size"]
        self.transform = build_transform(self.manifest["family"], train, self.image_size)
        self.epoch = 0
        if train and len(self.index) < world_size * batch_size:
            raise BitbenchError(f"split '{split}' has {len(self.index)} samples, fewer than world size × batch size "
                                f"= {world_size * batch_size}: a training epoch would be empty")

    @property
    def num_samples(self) -> int:
        """Samples in the whole split (all ranks)."""
        return len(self.index)

    @property
    def keys(self) -> list[str]:
        """Sample keys of the split, by row."""
        return self.index.keys

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = int(epoch)

    def _cap(self, batches: int) -> int:
        return batches if self.max_batches is None else min(batches, self.max_batches)

    def __len__(self) -> int:
        n, w, b = len(self.index), self.world_size, self.batch_size
        if self.train:
            return self._cap(n // (w * b))
        share = (self.rank + 1) * n // w - self.rank * n // w
        return self._cap(math.ceil(share / b))

    def plan(self) -> list[np.ndarray]:
        """This rank's batches for the current epoch, as rows of the split."""
        n, w, b = len(self.index), self.world_size, self.batch_size
        if self.train:
            per_rank = n // (w * b) * b
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            rows = perm[self.rank * per_rank:(self.rank + 1) * per_rank]
        else:
            rows = np.arange(self.rank * n // w, (self.rank + 1) * n // w)
        return [rows[i:i + b] for i in range(0, len(rows), b)][:len(self)]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        plan = self.plan()
        if not plan:
            return
        seed_parts = (self.seed, self.epoch, self.rank) if self.train else None
        dataset = _Batches(self.index, plan, self.manifest, self.transform, seed_parts, self.return_index)
        if self.num_workers == 0:
            items = (dataset[b] for b in range(len(dataset)))
        else:
            # Our own generator: the DataLoader's base-seed draw must not consume the training process's RNG.
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) & 0xFFFF_FFFF)
            # Fork where there is fork: workers start in milliseconds each epoch, also inside processes that were
            # themselves spawned (whose default would be spawn: a fresh interpreter importing torch per worker).
            context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            items = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                                pin_memory=self.pin_memory, generator=generator,
                                                multiprocessing_context=context)
        for item in items:
            if isinstance(item, dict):
                raise BitbenchError(item["error"])
            yield item
