"""`bitbench prepare`: convert a dataset into byte-reproducible WebDataset shards with a checksummed manifest.

Writes train (official train minus a seeded hold-out), val (the hold-out, for model selection) and test (the
official test/val split) as `<split>-NNNNNN.tar`, plus manifest.json and timm's _info.json. The output folder
appears complete or not at all. See benchmark/data/shards.py for the format.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmark.data.shards import DEFAULT_SHARD_SIZE
from benchmark.data.sources import DATASETS, DEFAULT_VAL_SIZE
from benchmark.errors import BitbenchError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, metavar="NAME", help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--source", metavar="PATH",
                        help="local copy: a folder with the idx files (fashion-mnist, default: Debian's "
                             "dataset-fashion-mnist), torchvision's cifar-10-batches-py/ or cifar-100-python/ "
                             "parent (cifar), an ILSVRC2012 folder with train/ and val/ (imagenet)")
    parser.add_argument("--download", action="store_true", help="cifar: download through torchvision")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced atomically)")
    parser.add_argument("--val-size", type=int, metavar="N",
                        help="images held out of the train split for model selection "
                             "(default 5000; imagenet 10000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val hold-out (default 0)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                        help=f"samples per shard (default {DEFAULT_SHARD_SIZE}); streaming readers need "
                             f"#shards >= ranks x workers")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from benchmark.data.shards import check_output_folder, write_dataset
    from benchmark.data.sources import load_source

    if args.dataset not in DATASETS:
        raise BitbenchError(f"unknown dataset '{args.dataset}'; valid: {', '.join(DATASETS)}")
    if args.shard_size < 1:
        raise BitbenchError(f"--shard-size must be at least 1, got {args.shard_size}")
    out = Path(args.out).expanduser().absolute()
    check_output_folder(out)  # before the (possibly long) read of the source
    source = load_source(args.dataset, args.source, args.download)
    val_size = DEFAULT_VAL_SIZE[args.dataset] if args.val_size is None else args.val_size
    manifest = write_dataset(source, out, val_size=val_size, seed=args.seed, shard_size=args.shard_size,
                             progress=not args.quiet)
    counts = ", ".join(f"{name} {split['count']} ({len(split['shards'])} shards)"
                       for name, split in manifest["splits"].items())
    print(f"prepared {args.dataset} in {out}: {counts}")
    return 0
