"""manifest.json of a prepared dataset: read it and check the shards it lists before anything trains on them."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from benchmark.errors import BitbenchError

MANIFEST_NAME = "manifest.json"
INFO_NAME = "_info.json"  # timm's reader_wds looks for this next to the shards
FORMAT = "bitbench-webdataset"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
VERIFY_MODES = ("none", "fast", "full")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(data_dir: str | os.PathLike, verify: str = "fast") -> dict:
    """Read `data_dir/manifest.json` and check its shards: "fast" compares byte sizes, "full" also sha256,
    "none" nothing. A missing, truncated or changed shard raises BitbenchError naming it."""
    if verify not in VERIFY_MODES:
        raise BitbenchError(f"verify must be one of {', '.join(VERIFY_MODES)}, got '{verify}'")
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise BitbenchError(f"{data_dir} is not a prepared dataset (no {MANIFEST_NAME}); run `bitbench prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BitbenchError(f"cannot read {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BitbenchError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BitbenchError(f"{path} has format version {manifest.get('format_version')}, this bitbench reads "
                            f"{FORMAT_VERSION}; run `bitbench prepare` again")
    if verify != "none":
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                check_shard(data_dir / shard["name"], shard, full=verify == "full")
    return manifest


def check_shard(path: Path, entry: dict, full: bool = False) -> None:
    """Compare one shard file with its manifest entry (size; sha256 when `full`)."""
    try:
        size = path.stat().st_size
    except OSError:
        raise BitbenchError(f"shard {path.name} listed in the manifest is missing from {path.parent}") from None
    if size != entry["bytes"]:
        raise BitbenchError(f"shard {path} is {size} bytes, the manifest says {entry['bytes']} (truncated or changed)")
    if full and sha256_file(path) != entry["sha256"]:
        raise BitbenchError(f"shard {path} does not match its sha256 in the manifest (corrupt or changed)")


def shard_paths(manifest: dict, data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Paths of `split`'s shards, in order."""
    if split not in manifest["splits"]:
        raise BitbenchError(f"unknown split '{split}'; the dataset has {', '.join(manifest['splits'])}")
    return [Path(data_dir) / s["name"] for s in manifest["splits"][split]["shards"]]
