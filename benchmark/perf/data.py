"""`bitbench perf data`: images/s of the shard reader against torchvision's in-memory FashionMNIST, in one run,
and against the fastest training step of the suite (the reader must keep ahead of the GPU/CPU it feeds).

Both readers use the same transforms (pad 2 + random crop, normalisation), batch size, worker count and number
of batches; throughput is measured from the first batch on (worker start-up is reported apart). The training
steps (every method on the default architecture, same batch size and image shape) are timed after the readers
have finished, with `benchmark.perf.step`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from benchmark.errors import BitbenchError

SUPPORTED = ("fashion-mnist",)  # datasets whose torchvision baseline needs nothing but what is installed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="fashion-mnist", help=f"one of: {', '.join(SUPPORTED)}")
    parser.add_argument("--data", metavar="DIR", help="prepared dataset (default: prepare into a temporary folder)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers on both sides (default 2)")
    parser.add_argument("--batches", type=int, default=50, help="batches measured on each side (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-arch", default=None, help="architecture of the training steps (default: resnet20)")
    parser.add_argument("--step-methods", nargs="+", metavar="METHOD[:VARIANT]",
                        help="methods whose training step is timed (default: every registered method)")
    parser.add_argument("--step-reps", type=int, default=3, help="timed training steps per method (default 3)")


def throughput(batches: Iterable, limit: int) -> dict:
    """Images/s over batches 2..limit (after the first batch, so worker start-up is excluded) and the
    time to the first batch."""
    start = time.perf_counter()
    first = None
    images = 0
    count = 0
    for count, batch in enumerate(batches, 1):
        if first is None:
            first = time.perf_counter()
        else:
            images += len(batch[1])
        if count == limit:
            break
    end = time.perf_counter()
    if count < 2:
        raise BitbenchError(f"only {count} batch(es) to measure; lower --batch-size or raise --batches")
    return {"images_per_s": images / (end - first), "first_batch_s": first - start, "batches": count,
            "images": images}


def measure_reader(data_dir: str | Path, batch_size: int, workers: int, batches: int, seed: int = 0) -> dict:
    """Training-mode throughput of benchmark.data.ShardLoader on the train split."""
    from benchmark.data import ShardLoader

    loader = ShardLoader(data_dir, "train", batch_size, train=True, seed=seed, num_workers=workers,
                         max_batches=batches, pin_memory=False)
    return throughput(loader, batches)


def measure_torchvision(mean: list[float], std: list[float], batch_size: int, workers: int, batches: int,
                        seed: int = 0) -> dict:
    """The same transforms on torchvision's FashionMNIST (all in memory) through a plain DataLoader."""
    import torch
    from torchvision.transforms import v2

    from benchmark.data.sources import torchvision_fashion_mnist

    transform = v2.Compose([v2.ToImage(), v2.RandomCrop(28, padding=2), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(mean, std)])
    dataset = torchvision_fashion_mnist(train=True, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, generator=torch.Generator().manual_seed(seed))
    return throughput(loader, batches)


def fastest_training_step(arch: str | None, methods: list[str] | None, batch_size: int, image_size: int,
                          in_channels: int, num_classes: int, reps: int, seed: int = 0) -> dict:
    """The fastest method's training step (median, `bitbench perf step` settings) as images/s."""
    from benchmark.perf.step import DEFAULT_ARCH, measure

    result = measure(arch or DEFAULT_ARCH, methods, batch_size, image_size, in_channels, num_classes, reps=reps,
                     warmup=1, seed=seed, memory=False)
    row = min(result["rows"], key=lambda r: r["step_ms"])
    return {"arch": result["arch"], "method": row["method"], "variant": row["variant"], "stage": row["stage"],
            "step_ms": row["step_ms"], "images_per_s": row["step_images_per_s"], "threads": result["threads"],
            "device": result["device"], "methods_timed": len(result["rows"])}


def run(args: argparse.Namespace) -> int:
    from benchmark.perf.step import passive_omp_wait

    passive_omp_wait()  # before torch loads: the training steps are timed in this process
    from benchmark.data import load_manifest

    if args.dataset not in SUPPORTED:
        raise BitbenchError(f"perf data compares against torchvision for {', '.join(SUPPORTED)} only, "
                            f"not '{args.dataset}'")
    if args.batch_size < 1 or args.workers < 0 or args.batches < 2 or args.step_reps < 1:
        raise BitbenchError("need --batch-size >= 1, --workers >= 0, --batches >= 2 and --step-reps >= 1")
    with tempfile.TemporaryDirectory(prefix="bitbench-perf-data-") as scratch:
        data_dir = Path(args.data) if args.data else Path(scratch) / args.dataset
        if not args.data:
            from benchmark.data.shards import write_dataset
            from benchmark.data.sources import DEFAULT_VAL_SIZE, load_source

            write_dataset(load_source(args.dataset), data_dir, val_size=DEFAULT_VAL_SIZE[args.dataset],
                          seed=args.seed, progress=False)
        manifest = load_manifest(data_dir, verify="fast")
        if manifest["dataset"] != args.dataset:
            raise BitbenchError(f"{data_dir} holds {manifest['dataset']}, not {args.dataset}")
        reader = measure_reader(data_dir, args.batch_size, args.workers, args.batches, args.seed)
        baseline = measure_torchvision(manifest["mean"], manifest["std"], args.batch_size, args.workers,
                                       args.batches, args.seed)
    fastest = fastest_training_step(args.step_arch, args.step_methods, args.batch_size, int(manifest["image_size"]),
                                    int(manifest["channels"]), len(manifest["classes"]), args.step_reps, args.seed)
    report = {
        "dataset": args.dataset, "batch_size": args.batch_size, "workers": args.workers, "batches": args.batches,
        "shard_reader": reader, "torchvision_in_memory": baseline,
        "ratio": reader["images_per_s"] / baseline["images_per_s"],
        "fastest_training_step": fastest,
        # reader images/s over the fastest training step's images/s (target >= 3)
        "vs_fastest_training_step": reader["images_per_s"] / fastest["images_per_s"],
    }
    print(json.dumps(report, indent=2))
    return 0
