"""`bitbench report`: the leaderboard of every run against published numbers, as markdown, JSON and figures.

`collect` finds the runs (grid, run directories, launch summary), `published` loads the cited numbers,
`leaderboard` aggregates seeds and decides each status, `render` and `figures` write the outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from benchmark.report.collect import collect_runs, expected_cells
from benchmark.runs import load_params
from benchmark.report.leaderboard import COMPARE, build_leaderboard
from benchmark.report.published import load_published
from benchmark.report.render import render_markdown, render_summary

__all__ = ["write_report", "add_arguments", "run"]


def write_report(runs_root: str | Path | None = None, params: str | Path | None = None, out: str | Path = ".",
                 tolerance: float = 1.0, compare: str = "final", published: str | Path | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Write `out/leaderboard.md`, `out/leaderboard.json` and `out/figures/*.png` (each replaced atomically)
    and return the leaderboard data. `runs_root` defaults to the params' `runs_root`, else `runs`."""
    from benchmark.report.figures import write_figures

    cells = None
    if params is not None:
        loaded = load_params(params)
        cells = expected_cells(loaded)
        runs_root = runs_root or loaded.get("runs_root")
    runs_root = Path(runs_root or "runs")
    rows = load_published(published)
    runs = collect_runs(runs_root, cells)
    board = build_leaderboard(runs, rows, tolerance=tolerance, compare=compare, progress=progress)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".figures-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        figures = write_figures(board, rows, staging)
        board["figures"] = figures
        board["inputs"] = {"runs_root": str(runs_root), "params": None if params is None else str(params),
                           "published": str(published) if published else "benchmark/published.yaml"}
        markdown = render_markdown(board, str(runs_root), None if params is None else str(params), figures)
        _swap_folder(staging, out / "figures")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _atomic_write(out / "leaderboard.json", json.dumps(board, indent=2, default=str) + "\n")
    _atomic_write(out / "leaderboard.md", markdown)
    return board


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _swap_folder(new: Path, target: Path) -> None:
    """Put a fully written folder in place of `target`; the old one is removed only after the swap."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}-old-{os.getpid()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", help="runs root (default: runs_root from --params, else runs)")
    p.add_argument("--params", help="params.yaml with the expected `grid:`; without it only existing runs show")
    p.add_argument("--out", default=".", help="folder for leaderboard.md, leaderboard.json and figures/")
    p.add_argument("--tolerance", type=float, default=1.0,
                   help="points below the published top-1 that still count as reproduced (default 1.0)")
    p.add_argument("--compare", choices=sorted(COMPARE), default="final",
                   help="which measured top-1 the verdict uses: final epoch or best-on-val epoch")
    p.add_argument("--published", help="published numbers YAML (default: benchmark/published.yaml)")


def run(args: argparse.Namespace) -> int:
    board = write_report(args.runs, args.params, args.out, tolerance=args.tolerance, compare=args.compare,
                         published=args.published)
    print(render_summary(board))
    n_figs = sum(len(v) for v in board["figures"].values())
    out = Path(args.out)
    print(f"wrote {out / 'leaderboard.md'}, {out / 'leaderboard.json'} and {n_figs} figure(s) in {out / 'figures'}")
    return 0
