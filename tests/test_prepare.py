"""`bitbench prepare`: real Fashion-MNIST shards against torchvision, reproducibility, ImageNet layouts, bad input."""
from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from benchmark.data import iter_samples, load_manifest
from benchmark.data.manifest import sha256_file
from benchmark.data.shards import split_train_val, write_dataset
from benchmark.data.sources import load_source, torchvision_fashion_mnist
from benchmark.errors import BitbenchError

REPO = Path(__file__).resolve().parents[1]
WNIDS = ["n01440764", "n01443537", "n01484850"]  # sorted: class 0, 1, 2
VAL_CLASSES = [2, 0, 1, 2, 1, 0]  # class of ILSVRC2012_val_0000000{1..6}
ILSVRC_ID = {"n01484850": 1, "n01440764": 2, "n01443537": 3}  # the devkit's ids are not in wnid order


def bitbench(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def torchvision_splits():
    return {"train": torchvision_fashion_mnist(train=True), "test": torchvision_fashion_mnist(train=False)}


def key_index(key: str) -> int:
    return int(key.split("_")[1])


def test_fashion_mnist_shards_equal_torchvision(fmnist_dir, torchvision_splits):
    seen = {}
    for split, origin in (("train", "train"), ("val", "train"), ("test", "test")):
        reference = torchvision_splits[origin]
        indices = []
        for key, image, label in iter_samples(fmnist_dir, split):
            assert key.startswith(f"{split}_") and "." not in key
            index = key_index(key)
            pil, expected_label = reference[index]
            assert image.shape == (1, 28, 28)
            assert np.array_equal(image[0].numpy(), np.array(pil)), key
            assert label == expected_label, key
            indices.append(index)
        assert indices == sorted(indices)
        seen[split] = set(indices)
    assert len(seen["train"]) == 55_000 and len(seen["val"]) == 5_000 and len(seen["test"]) == 10_000
    assert not seen["train"] & seen["val"]
    assert seen["train"] | seen["val"] == set(range(60_000))
    assert seen["test"] == set(range(10_000))


def test_manifest_describes_the_shards(fmnist_dir, torchvision_splits):
    manifest = load_manifest(fmnist_dir, verify="full")
    assert manifest["dataset"] == "fashion-mnist" and manifest["channels"] == 1 and manifest["image_ext"] == "png"
    assert manifest["classes"] == torchvision_splits["train"].classes
    assert manifest["image_size"] == 28 and manifest["stored_size"] == [28, 28]
    assert manifest["source"]["package"] == "dataset-fashion-mnist" and manifest["seed"] == 0
    counts = {name: split["count"] for name, split in manifest["splits"].items()}
    assert counts == {"train": 55_000, "val": 5_000, "test": 10_000}
    train_shards = manifest["splits"]["train"]["shards"]
    assert [s["name"] for s in train_shards] == [f"train-{i:06d}.tar" for i in range(6)]
    assert [s["samples"] for s in train_shards] == [10_000] * 5 + [5_000]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = fmnist_dir / shard["name"]
            assert path.stat().st_size == shard["bytes"] and sha256_file(path) == shard["sha256"]
    # mean/std: per channel over the train split, in [0, 1] units
    train_rows, _ = split_train_val(60_000, 5_000, seed=0)
    pixels = torchvision_splits["train"].data.numpy()[train_rows].astype(np.float64) / 255.0
    assert manifest["mean"][0] == pytest.approx(pixels.mean(), abs=1e-9)
    assert manifest["std"][0] == pytest.approx(pixels.std(), abs=1e-9)
    info = json.loads((fmnist_dir / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 55_000
    assert info["splits"]["train"]["filenames"] == [s["name"] for s in train_shards]


def test_shards_read_with_webdataset(fmnist_dir):
    import webdataset as wds

    url = str(fmnist_dir / "test-000000.tar")
    dataset = wds.WebDataset(url, shardshuffle=False).decode("l8").to_tuple("__key__", "png", "cls")
    ours = iter_samples(fmnist_dir, "test")
    for (key, image, label), (our_key, our_image, our_label) in zip(dataset, ours, strict=True):
        assert (key, label) == (our_key, our_label)
        assert np.array_equal(image, our_image[0].numpy())
    with tarfile.open(url) as tar:
        members = tar.getmembers()
    assert len(members) == 20_000 and {m.mtime for m in members} == {0}
    assert [m.name for m in members[:2]] == ["test_0000000.cls", "test_0000000.png"]


def test_prepare_twice_is_byte_identical(fmnist_dir, tmp_path):
    again = tmp_path / "again"
    result = bitbench("prepare", "--dataset", "fashion-mnist", "--out", str(again), "--quiet")
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in fmnist_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(fmnist_dir, again, names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names) == 10  # 8 shards + 2 json
    assert leftovers(tmp_path) == []


def test_val_hold_out_is_seeded():
    train_a, val_a = split_train_val(1000, 100, seed=0)
    train_b, val_b = split_train_val(1000, 100, seed=0)
    _, val_c = split_train_val(1000, 100, seed=1)
    assert np.array_equal(val_a, val_b) and np.array_equal(train_a, train_b)
    assert not np.array_equal(val_a, val_c)
    assert len(val_a) == 100 and not set(val_a) & set(train_a) and len(train_a) + len(val_a) == 1000


# ---------------------------------------------------------------- ImageNet on a tiny fake ILSVRC2012 folder

def make_fake_imagenet(root: Path, val_layout: str) -> Path:
    """3 classes × 4 train JPEGs and 6 val JPEGs (sizes vary), val as <wnid>/ folders or flat + devkit files."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def jpeg(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(20, 48, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, "JPEG", quality=85)

    for wnid in WNIDS:
        for i in range(4):
            jpeg(root / "train" / wnid / f"{wnid}_{i + 1}.JPEG")
    for number, cls in enumerate(VAL_CLASSES, 1):
        name = f"ILSVRC2012_val_{number:08d}.JPEG"
        jpeg(root / "val" / (WNIDS[cls] if val_layout == "folders" else "") / name)
    if val_layout == "flat":
        import scipy.io

        devkit = root / "ILSVRC2012_devkit_t12" / "data"
        devkit.mkdir(parents=True)
        (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{ILSVRC_ID[WNIDS[c]]}\n" for c in VAL_CLASSES))
        fields = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        synsets = [(i, w, f"class {w}", 0) for w, i in ILSVRC_ID.items()] + [(4, "n00001740", "entity", 3)]
        scipy.io.savemat(devkit / "meta.mat", {"synsets": np.array(synsets, dtype=fields)})
    return root


def tar_files(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_imagenet_layouts_store_original_jpeg_bytes(tmp_path):
    pytest.importorskip("scipy", reason="the flat val layout reads the devkit's meta.mat with scipy")
    outs = {layout: tmp_path / f"out-{layout}" for layout in ("folders", "flat")}
    flat = make_fake_imagenet(tmp_path / "src-flat", "flat")
    result = bitbench("prepare", "--dataset", "imagenet", "--source", str(flat), "--out", str(outs["flat"]),
                      "--val-size", "2", "--shard-size", "4", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(f"prepared imagenet in {outs['flat']}: train 10 (3 shards)")
    write_dataset(load_source("imagenet", make_fake_imagenet(tmp_path / "src-folders", "folders")), outs["folders"],
                  val_size=2, shard_size=4, progress=False)
    manifest = load_manifest(outs["flat"], verify="full")
    assert manifest["classes"] == WNIDS and manifest["image_ext"] == "jpg" and manifest["stored_size"] is None
    assert {n: s["count"] for n, s in manifest["splits"].items()} == {"train": 10, "val": 2, "test": 6}
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [4, 4, 2]
    assert len(manifest["mean"]) == 3 and all(0 < m < 1 for m in manifest["mean"] + manifest["std"])
    # both val layouts give the same keys, labels and bytes
    shard_names = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    assert all(filecmp.cmp(outs["flat"] / n, outs["folders"] / n, shallow=False) for n in shard_names)
    # labels follow sorted wnid order (not the devkit's ids); bytes are the original files
    test = {k: v for n in shard_names if n.startswith("test") for k, v in tar_files(outs["flat"] / n).items()}
    train_files = sorted((tmp_path / "src-flat" / "train").glob("*/*.JPEG"))
    for number, cls in enumerate(VAL_CLASSES, 1):
        original = (tmp_path / "src-flat" / "val" / f"ILSVRC2012_val_{number:08d}.JPEG").read_bytes()
        assert test[f"test_{number - 1:07d}.jpg"] == original
        assert test[f"test_{number - 1:07d}.cls"] == str(cls).encode()
    for name in shard_names:
        for member, data in tar_files(outs["flat"] / name).items():
            key, ext = member.split(".")
            if ext == "jpg" and not key.startswith("test"):
                path = train_files[key_index(key)]
                assert data == path.read_bytes()
                assert tar_files(outs["flat"] / name)[f"{key}.cls"] == str(WNIDS.index(path.parent.name)).encode()


def test_failed_prepare_keeps_the_previous_dataset(tmp_path):
    source = make_fake_imagenet(tmp_path / "src", "folders")
    out = tmp_path / "data" / "imagenet"

    def prepare(seed: int = 0, **kwargs) -> None:
        write_dataset(load_source("imagenet", source), out, val_size=2, seed=seed, progress=False, **kwargs)

    prepare()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    prepare(seed=1)  # replaces: a new val hold-out
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1 and leftovers(out.parent) == []
    prepare()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # and back, byte for byte
    # a source file vanishing mid-way through the train split: the write fails, the old dataset stays
    partial = load_source("imagenet", source)
    (source / "train" / WNIDS[2] / f"{WNIDS[2]}_4.JPEG").unlink()
    with pytest.raises(BitbenchError, match="cannot read"):
        write_dataset(partial, out, val_size=2, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(out.parent) == []


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def wrong_layout(tmp_path: Path) -> Path:
    (tmp_path / "src" / "images").mkdir(parents=True)
    return tmp_path / "src"


def bad_class_folder(tmp_path: Path) -> Path:
    root = make_fake_imagenet(tmp_path / "src", "folders")
    (root / "train" / "cats").mkdir()
    return root


def flat_val_without_devkit(tmp_path: Path) -> Path:
    root = make_fake_imagenet(tmp_path / "src", "folders")
    for path in (root / "val").glob("*/*.JPEG"):
        path.rename(root / "val" / path.name)
    for folder in (root / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    return root


@pytest.mark.parametrize("args, env, message", [
    (["--dataset", "mnist"], {}, "unknown dataset 'mnist'; valid: fashion-mnist, cifar10, cifar100, imagenet"),
    (["--dataset", "fashion-mnist"], {"BITBENCH_FASHION_MNIST_DIR": "/nonexistent"},
     "apt-get install dataset-fashion-mnist"),
    (["--dataset", "cifar10", "--source", "/nonexistent/cifar"], {}, "source folder /nonexistent/cifar does not exist"),
    (["--dataset", "cifar100"], {}, "cifar100 needs --source DIR"),
    (["--dataset", "cifar10", "--source", "{tmp}"], {}, "has no cifar-10-batches-py/"),
    (["--dataset", "imagenet", "--source", wrong_layout], {}, "is not an ILSVRC2012 folder"),
    (["--dataset", "imagenet", "--source", bad_class_folder], {}, "found cats/"),
    (["--dataset", "imagenet", "--source", flat_val_without_devkit], {}, "ILSVRC2012_validation_ground_truth.txt"),
    (["--dataset", "imagenet", "--source", make_fake_imagenet, "--val-size", "12"], {}, "--val-size must be between"),
    (["--dataset", "fashion-mnist", "--shard-size", "0"], {}, "--shard-size must be at least 1"),
], ids=["unknown-dataset", "no-debian-package", "missing-source", "cifar-no-source", "cifar-wrong-folder",
        "imagenet-layout", "imagenet-class-folder", "imagenet-no-ground-truth", "val-too-big", "shard-size"])
def test_bad_input_fails_with_one_line(tmp_path, args, env, message):
    args = [str(a(tmp_path / "in", "folders") if a is make_fake_imagenet else a(tmp_path) if callable(a)
                else a.format(tmp=tmp_path)) for a in args]
    out = tmp_path / "out"
    result = bitbench("prepare", *args, "--out", str(out), "--quiet", env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bitbench prepare: error: "), result.stderr
    assert message in lines[0]
    assert not out.exists() and leftovers(tmp_path) == []


def test_out_that_is_not_a_dataset_is_left_alone(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = bitbench("prepare", "--dataset", "fashion-mnist", "--out", str(out), "--quiet")
    assert result.returncode == 2 and "is not a bitbench dataset" in result.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
