"""Datasets as checksummed WebDataset shards: `bitbench prepare` writes them, `ShardLoader` feeds training.

`load_manifest(dir, verify=...)` reads and checks a prepared dataset; `ShardLoader(dir, split, batch_size,
train=..., seed=..., rank=..., world_size=...)` yields normalised `(images, labels)` batches, the same number
on every rank; `iter_samples(dir, split)` gives the raw decoded samples. Names load lazily, so that importing
the package (e.g. for the CLI's argument parsing) does not import torch.
"""
import importlib

_EXPORTS = {
    "load_manifest": "benchmark.data.manifest",
    "ShardLoader": "benchmark.data.reader",
    "iter_samples": "benchmark.data.reader",
    "DATASETS": "benchmark.data.sources",
    "DEFAULT_VAL_SIZE": "benchmark.data.sources",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'benchmark.data' has no attribute '{name}'")
