"""Shared fixtures. Data: the real Fashion-MNIST (Debian's dataset-fashion-mnist files) prepared once per session."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    """`bitbench prepare --dataset fashion-mnist` output with the defaults (val 5,000, seed 0, 10,000 per shard):
    train 55,000 in 6 shards, val 5,000, test 10,000. Read-only for tests: copy it before changing anything."""
    from benchmark.data.shards import write_dataset
    from benchmark.data.sources import load_source

    out = tmp_path_factory.mktemp("data") / "fashion-mnist"
    write_dataset(load_source("fashion-mnist"), out, val_size=5000, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of small models: on a shared 2-core machine spinning threads only cost."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
