"""benchmark.data: manifest checks, corrupt shards, exact DDP splitting (real gloo processes), transforms, perf data."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.data import ShardLoader, iter_samples, load_manifest
from benchmark.data.reader import index_shard
from benchmark.data.shards import write_dataset
from benchmark.data.sources import Source, SplitData, torchvision_fashion_mnist
from benchmark.data.transforms import ResizeCenterCrop
from benchmark.errors import BitbenchError

REPO = Path(__file__).resolve().parents[1]


def array_source(images: np.ndarray, labels: np.ndarray, n_test: int, family: str) -> Source:
    """A Source over in-memory uint8 N×H×W×C images: the last `n_test` rows form the test split."""
    n = len(images) - n_test
    split = lambda rows: SplitData(labels=labels[rows].astype(np.int64), index=np.arange(len(rows)),  # noqa: E731
                                   images=images[rows])
    return Source(f"tiny-{family}", family, [str(c) for c in range(10)], channels=images.shape[-1], image_ext="png",
                  image_size=images.shape[1], stored_size=images.shape[1:3], train=split(np.arange(n)),
                  test=split(np.arange(n, len(images))))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """62 real Fashion-MNIST images: train 50 in uneven shards (7 × 7 + 1), val 2, test 10 (7 + 3)."""
    fmnist = torchvision_fashion_mnist(train=True)
    source = array_source(fmnist.data.numpy()[:62, :, :, None], fmnist.targets.numpy()[:62], 10, "mnist")
    out = tmp_path_factory.mktemp("tiny") / "data"
    write_dataset(source, out, val_size=2, seed=0, shard_size=7, progress=False)
    return out


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- manifest and corrupt shards

def test_manifest_checks_name_the_shard(tiny_dir, tmp_path):
    assert [s["samples"] for s in load_manifest(tiny_dir, verify="full")["splits"]["train"]["shards"]] == [7] * 7 + [1]
    data = tmp_path / "data"

    def fresh() -> Path:
        shutil.rmtree(data, ignore_errors=True)
        shutil.copytree(tiny_dir, data)
        return data

    with open(fresh() / "train-000001.tar", "r+b") as f:  # truncated mid-way
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(BitbenchError) as err:
        load_manifest(data)
    assert "train-000001.tar" in one_line_error(err) and "truncated" in str(err.value)
    with pytest.raises(BitbenchError, match="train-000001.tar is truncated"):
        ShardLoader(data, "train", 4, train=True, verify="none")

    (fresh() / "test-000001.tar").unlink()  # missing
    with pytest.raises(BitbenchError, match="shard test-000001.tar listed in the manifest is missing"):
        load_manifest(data)

    with open(fresh() / "train-000000.tar", "r+b") as f:  # a header byte changed: its checksum fails
        f.seek(3)
        f.write(b"X")
    load_manifest(data, verify="fast")  # same size: only the checksum can tell
    with pytest.raises(BitbenchError, match="train-000000.tar does not match its sha256"):
        load_manifest(data, verify="full")
    with pytest.raises(BitbenchError, match="train-000000.tar is corrupt at byte 0"):
        ShardLoader(data, "train", 4, train=True)

    with pytest.raises(BitbenchError, match="not a prepared dataset"):
        load_manifest(tmp_path)
    with pytest.raises(BitbenchError, match="unknown split 'dev'"):
        ShardLoader(tiny_dir, "dev", 4, train=False)
    with pytest.raises(BitbenchError, match="verify must be one of"):
        load_manifest(tiny_dir, verify="quick")


@pytest.mark.parametrize("workers", [0, 2])
def test_undecodable_image_names_shard_and_key(tiny_dir, tmp_path, workers):
    data = tmp_path / "data"
    shutil.copytree(tiny_dir, data)
    keys, offsets, _, _ = index_shard(data / "test-000001.tar", "png")
    with open(data / "test-000001.tar", "r+b") as f:
        f.seek(offsets[1])
        f.write(b"not a png")
    loader = ShardLoader(data, "test", 4, train=False, num_workers=workers)
    with pytest.raises(BitbenchError) as err:
        list(loader)
    assert one_line_error(err).startswith(f"image {keys[1]} in shard test-000001.tar does not decode")


# ---------------------------------------------------------------- splitting

def test_eval_loader_yields_each_sample_once_in_order(tiny_dir):
    raw = {key: (image, label) for key, image, label in iter_samples(tiny_dir, "train")}
    manifest = load_manifest(tiny_dir)
    for world_size in (1, 2, 3):
        rows = []
        for rank in range(world_size):
            loader = ShardLoader(tiny_dir, "train", 4, train=False, rank=rank, world_size=world_size,
                                 num_workers=0, return_index=True)
            batches = list(loader)
            assert len(batches) == len(loader)
            for images, labels, index in batches:
                assert images.dtype == torch.float32 and images.shape[1:] == (1, 28, 28)
                for image, label, row in zip(images, labels, index, strict=True):
                    pixels, expected = raw[loader.keys[row]]
                    assert int(label) == expected
                    torch.testing.assert_close(image, (pixels.float() / 255 - manifest["mean"][0]) / manifest["std"][0])
                rows += index.tolist()
        assert rows == list(range(50))


def collect(loader: ShardLoader) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t.clone() for t in batch) for batch in loader]


def test_train_loader_is_equal_disjoint_reshuffled_and_reproducible(tiny_dir):
    def epoch(rank: int, world_size: int, epoch: int = 0, seed: int = 0, workers: int = 0):
        loader = ShardLoader(tiny_dir, "train", 4, train=True, seed=seed, rank=rank, world_size=world_size,
                             num_workers=workers, return_index=True)
        loader.set_epoch(epoch)
        return loader, collect(loader)

    for world_size in (1, 3):
        seen = []
        for rank in range(world_size):
            loader, batches = epoch(rank, world_size)
            assert len(loader) == len(batches) == 50 // (world_size * 4)
            assert all(len(labels) == 4 for _, labels, _ in batches)
            for _, labels, index in batches:
                assert labels.tolist() == loader.index.labels[index.numpy()].tolist()
            seen += [row for _, _, index in batches for row in index.tolist()]
        assert len(seen) == len(set(seen)) == 50 // (world_size * 4) * world_size * 4
    _, first = epoch(0, 1)
    _, again = epoch(0, 1, workers=2)  # same batches, augmentation included, whatever the worker count
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    _, second_epoch = epoch(0, 1, epoch=1)
    _, other_seed = epoch(0, 1, seed=1)
    order = lambda batches: [r for _, _, i in batches for r in i.tolist()]  # noqa: E731
    assert order(second_epoch) != order(first) and order(other_seed) != order(first)
    capped = ShardLoader(tiny_dir, "train", 4, train=True, max_batches=2, num_workers=0)
    assert len(capped) == len(list(capped)) == 2
    open_files = len(os.listdir("/proc/self/fd"))
    for e in range(5):  # shard files are closed again after each epoch
        capped.set_epoch(e)
        list(capped)
    assert len(os.listdir("/proc/self/fd")) == open_files
    with pytest.raises(BitbenchError, match="fewer than world size × batch size"):
        ShardLoader(tiny_dir, "train", 16, train=True, world_size=4)


def _ddp_rank(rank: int, world_size: int, data_dir: str, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    loader = ShardLoader(data_dir, "train", 4, train=True, seed=3, rank=rank, world_size=world_size,
                         num_workers=1, return_index=True)
    record = {"len": len(loader), "epochs": []}
    for epoch in range(2):
        loader.set_epoch(epoch)
        rows, batches = [], 0
        for images, _, index in loader:
            total = images.sum().reshape(1)
            dist.all_reduce(total)  # a collective per batch, as DDP's backward does: unequal counts would hang
            rows += index.tolist()
            batches += 1
        record["epochs"].append({"batches": batches, "rows": rows})
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


def test_two_process_ddp_read_over_uneven_shards(tiny_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_rank, args=(2, str(tiny_dir), port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["len"] == ranks[1]["len"] == 6  # 50 samples in shards of 7,...,7,1: 48 used per epoch
    for epoch in range(2):
        a, b = (r["epochs"][epoch] for r in ranks)
        assert a["batches"] == b["batches"] == 6
        assert len(set(a["rows"]) | set(b["rows"])) == 48 and not set(a["rows"]) & set(b["rows"])
    assert ranks[0]["epochs"][0]["rows"] != ranks[0]["epochs"][1]["rows"]


# ---------------------------------------------------------------- transforms

def denormalise(images: torch.Tensor, manifest: dict) -> torch.Tensor:
    mean = torch.tensor(manifest["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(manifest["std"]).view(1, -1, 1, 1)
    pixels = (images * std + mean) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    return pixels.round().to(torch.uint8)


def crop_offsets(output: torch.Tensor, original: torch.Tensor, pad: int, flips: bool) -> set:
    """The (dy, dx, flipped) under which `output` is a crop of the zero-padded `original`."""
    padded = torch.nn.functional.pad(original, (pad,) * 4)
    h, w = original.shape[-2:]
    found = set()
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, dy:dy + h, dx:dx + w]
            for flipped in (False, True) if flips else (False,):
                if torch.equal(output, window.flip(-1) if flipped else window):
                    found.add((dy, dx, flipped))
    return found


def test_fashion_mnist_training_augmentation_is_pad_2_crop(fmnist_dir):
    loader = ShardLoader(fmnist_dir, "train", 64, train=True, num_workers=0, max_batches=1, return_index=True)
    images, labels, index = next(iter(loader))
    originals = torchvision_fashion_mnist(train=True).data
    pixels = denormalise(images, loader.manifest)
    shifts = set()
    for output, row in zip(pixels, index.tolist(), strict=True):
        original = originals[int(loader.keys[row].split("_")[1])][None]
        found = crop_offsets(output, original, pad=2, flips=False)
        assert found, loader.keys[row]
        shifts |= found
    assert len(shifts) > 5  # the offsets vary


def test_cifar_training_augmentation_crops_and_flips(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 12, 12, 3), dtype=np.uint8)
    write_dataset(array_source(images, rng.integers(0, 10, 40), 8, "cifar"), tmp_path / "d", val_size=0,
                  shard_size=10, progress=False)
    loader = ShardLoader(tmp_path / "d", "train", 32, train=True, num_workers=0, return_index=True)
    batch, _, index = next(iter(loader))
    pixels = denormalise(batch, loader.manifest)
    flipped = []
    for output, row in zip(pixels, index.tolist(), strict=True):
        found = crop_offsets(output, torch.from_numpy(images[row]).permute(2, 0, 1), pad=4, flips=True)
        assert len(found) == 1
        flipped.append(found.pop()[2])
    assert 0 < sum(flipped) < 32
    evaluated = next(iter(ShardLoader(tmp_path / "d", "test", 8, train=False, num_workers=0)))[0]
    assert torch.equal(denormalise(evaluated, loader.manifest),
                       torch.from_numpy(images[32:]).permute(0, 3, 1, 2))  # eval: unchanged


def test_imagenet_transforms_on_jpeg_shards(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(12):
        h, w = rng.integers(30, 70, size=2)
        files.append(tmp_path / f"img{i}.JPEG")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(files[-1], quality=90)
    labels = np.arange(12) % 3
    split = lambda rows: SplitData(labels=labels[rows], index=np.arange(len(rows)),  # noqa: E731
                                   files=[files[r] for r in rows])
    source = Source("imagenet", "imagenet", ["a", "b", "c"], channels=3, image_ext="jpg", image_size=224,
                    stored_size=None, train=split(np.arange(8)), test=split(np.arange(8, 12)))
    write_dataset(source, tmp_path / "d", val_size=0, progress=False)
    train = next(iter(ShardLoader(tmp_path / "d", "train", 4, train=True, image_size=24, num_workers=0)))[0]
    assert train.shape == (4, 3, 24, 24)
    loader = ShardLoader(tmp_path / "d", "test", 4, train=False, image_size=24, num_workers=0)
    evaluated = denormalise(next(iter(loader))[0], loader.manifest)
    expected = ResizeCenterCrop(24)([image for _, image, _ in iter_samples(tmp_path / "d", "test")])
    assert torch.equal(evaluated, expected)
    assert ResizeCenterCrop(224).resize == 256


# ---------------------------------------------------------------- bitbench perf data

def test_perf_data_prints_both_throughputs(fmnist_dir):
    result = subprocess.run([sys.executable, "-m", "benchmark", "perf", "data", "--data", str(fmnist_dir),
                             "--batch-size", "64", "--batches", "4", "--workers", "0"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["shard_reader"]["batches"] == report["torchvision_in_memory"]["batches"] == 4
    assert report["shard_reader"]["images"] == 3 * 64
    assert report["ratio"] == pytest.approx(report["shard_reader"]["images_per_s"]
                                            / report["torchvision_in_memory"]["images_per_s"])
    listing = subprocess.run([sys.executable, "-m", "benchmark", "perf", "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=60).stdout
    assert all(name in listing for name in ("data", "step", "pipeline"))
