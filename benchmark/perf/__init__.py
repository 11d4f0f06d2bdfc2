"""`bitbench perf`: performance measurements, one module per measurement (`benchmark.perf.<name>`).

Each module exposes `add_arguments(parser)` and `run(args)` like a CLI subcommand, and keeps heavy imports
(torch) inside its functions, because every module's arguments are registered when `bitbench perf` parses.
"""
from __future__ import annotations

import argparse
import importlib

from benchmark.errors import BitbenchError

# measurement -> (module, one-line help)
MEASUREMENTS: dict[str, tuple[str, str]] = {
    "data": ("benchmark.perf.data", "shard reader images/s against torchvision's in-memory dataset"),
    "step": ("benchmark.perf.step", "training step time per method and architecture"),
    "pipeline": ("benchmark.perf.pipeline", "wall time of the whole pipeline"),
}


def _import(module: str):
    """The measurement's module, or None while it is not written yet."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            return None
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="measurement", required=True, metavar="MEASUREMENT")
    for name, (module, help_text) in MEASUREMENTS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_perf_module=module)
        found = _import(module)
        if found is not None:
            found.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    module = _import(args._perf_module)
    if module is None:
        raise BitbenchError(f"`bitbench perf {args.measurement}` is not available yet ({args._perf_module} is missing)")
    return int(module.run(args) or 0)
