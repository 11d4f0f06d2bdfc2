"""The `bitbench` command: one subcommand per module, each exposing `add_arguments(parser)` and `run(args)`."""
from __future__ import annotations

import argparse
import importlib
import sys

from benchmark.errors import BitbenchError

# subcommand -> (module, one-line help). Modules are imported only when their subcommand runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("benchmark.prepare", "convert a dataset into WebDataset shards with a checksummed manifest"),
    "models": ("benchmark.models", "list the methods, variants and architectures"),
    "ops": ("benchmark.ops", "count BOPs, FLOPs, OPs and parameters of a model"),
    "audit": ("benchmark.audit", "export binary layers as packed bits and check the rebuilt model"),
    "train": ("benchmark.train", "train one run"),
    "launch": ("benchmark.launch", "run a grid of runs locally or on SLURM through submitit"),
    "report": ("benchmark.report", "compile the leaderboard against published numbers"),
    "perf": ("benchmark.perf", "measure step time, reader throughput and pipeline wall time"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="bitbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except BitbenchError as err:
        print(f"bitbench {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bitbench {args.command}: interrupted", file=sys.stderr)
        return 130
