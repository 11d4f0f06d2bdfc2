"""Gather every run the leaderboard must show: the expected grid, the run directories, and the launcher's summary.

Nothing is dropped: a grid cell without a directory is `not run`, a directory with `error.txt` (or a failed entry
in `launch-summary.json`) is `failed` with its log, and directories outside the grid are listed too.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from benchmark.errors import BitbenchError
from benchmark.runs import run_name

SEED_DIR = re.compile(r"^seed(\d+)$")
CURVES = ("val_top1", "train_top1", "train_loss", "val_loss", "lr")
LAUNCH_SUMMARY = "launch-summary.json"


@dataclass
class Run:
    """One run: where it is (or would be), what state it is in, and what it measured."""

    dataset: str
    arch: str
    name: str  # the directory name: method[-variant]
    seed: int
    run_dir: Path
    method: str
    variant: str | None = None
    state: str = "not run"  # finished | failed | incomplete | not run
    in_grid: bool = False
    config: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    logs: list[str] = field(default_factory=list)
    reason: str | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def group(self) -> tuple[str, str, str]:
        return self.dataset, self.arch, self.name

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.arch}/{self.name}/seed{self.seed}"


def expected_cells(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid cells `bitbench launch` would run for these params (the same expansion, from benchmark.launch)."""
    from benchmark.launch import grid_cells

    grid = params["grid"]
    for key in ("datasets", "methods"):
        if not isinstance(grid.get(key), list) or not grid[key]:
            raise BitbenchError(f"params grid.{key} must be a non-empty list")
    for key in ("archs", "seeds"):
        if key in grid and not isinstance(grid[key], list):
            raise BitbenchError(f"params grid.{key} must be a list")
    return grid_cells(grid["datasets"], grid.get("archs") or ["resnet20"], grid["methods"],
                      grid.get("seeds") or [0])


def read_launch_summary(runs_root: Path) -> dict[tuple[str, ...], dict[str, Any]]:
    """Entries of `<runs_root>/launch-summary.json`, keyed by the run directory's last four parts
    (dataset, arch, name, seed<k>) so that absolute and relative paths agree. Missing or unreadable: empty."""
    path = runs_root / LAUNCH_SUMMARY
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    entries = doc.get("runs", []) if isinstance(doc, dict) else doc
    if isinstance(entries, dict):
        entries = [{"run_dir": k, **v} if isinstance(v, dict) else {"run_dir": k, "status": v}
                   for k, v in entries.items()]
    out = {}
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and (entry.get("run_dir") or entry.get("name")):
            parts = Path(entry.get("run_dir") or entry["name"]).parts[-4:]
            out[tuple(parts)] = entry
    return out


def collect_runs(runs_root: str | Path, cells: list[dict[str, Any]] | None = None) -> list[Run]:
    """Every run of the grid (present or not) and every run directory under `runs_root` (in the grid or not)."""
    runs_root = Path(runs_root)
    if not runs_root.is_dir():
        raise BitbenchError(f"runs directory {runs_root} does not exist (train or launch some runs first)")
    launch = read_launch_summary(runs_root)
    found: dict[tuple[str, ...], Run] = {}
    for seed_dir in sorted(runs_root.glob("*/*/*/seed*")):
        match = SEED_DIR.match(seed_dir.name)
        if not match or not seed_dir.is_dir() or ".stale" in seed_dir.parts:
            continue
        dataset, arch, name = seed_dir.parts[-4:-1]
        run = Run(dataset, arch, name, int(match.group(1)), seed_dir, method=name.split("-", 1)[0])
        _read_run_dir(run)
        found[tuple(seed_dir.parts[-4:])] = run

    runs: list[Run] = []
    claimed: set[tuple[str, ...]] = set()
    for cell in cells or []:
        names = [run_name(cell["method"], cell["variant"])]
        if cell["variant"] is None:
            default = _default_variant(cell["method"])
            if default:
                names.append(run_name(cell["method"], default))
        keys = [(cell["dataset"], cell["arch"], n, f"seed{cell['seed']}") for n in names]
        key = next((k for k in keys if k in found), keys[0])
        if key in claimed:
            continue
        claimed.add(key)
        run = found.get(key) or Run(cell["dataset"], cell["arch"], key[2], int(cell["seed"]),
                                    runs_root.joinpath(*key), method=cell["method"], variant=cell["variant"])
        run.in_grid = True
        runs.append(run)
    runs += [run for key, run in found.items() if key not in claimed]
    for run in runs:
        entry = launch.get(tuple(run.run_dir.parts[-4:]))
        if entry:
            _apply_launch_entry(run, entry)
    return runs


def _default_variant(method: str) -> str | None:
    try:
        from benchmark.models import get_method

        return get_method(method).default_variant
    except Exception:  # noqa: BLE001 - an unknown method or a missing registry only loses the alias
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_run_dir(run: Run) -> None:
    run.config = _read_json(run.run_dir / "config.json")
    metrics = _read_json(run.run_dir / "metrics.json")
    if run.config:
        run.method = run.config.get("method", run.method)
        run.variant = run.config.get("variant", run.variant)
    error = run.run_dir / "error.txt"
    stale = metrics is not None and run.config is not None and metrics.get("hash") != run.config.get("hash")
    if metrics is not None and not stale:
        run.state, run.metrics = "finished", metrics
        run.variant = run.variant or metrics.get("variant")
    elif error.is_file():
        run.state = "failed"
        run.logs.append(str(error))
        lines = [ln.strip() for ln in error.read_text(errors="replace").splitlines() if ln.strip()]
        run.reason = lines[-1] if lines else "error.txt is empty"
    else:
        run.state = "incomplete"
        run.reason = ("metrics.json belongs to another config (stale)" if stale else
                      "no metrics.json yet (running, or stopped before the end)")
    run.curves = read_curves(run.run_dir)


def _apply_launch_entry(run: Run, entry: dict[str, Any]) -> None:
    """Fold in what the launcher knows: a failed or skipped job, and the path of its log."""
    status = str(entry.get("status", "")).lower()
    log = entry.get("log") or entry.get("log_path") or entry.get("stderr")
    if run.state == "finished":
        return
    if status in ("failed", "error", "timeout", "oom", "node_fail"):
        run.state = "failed"
        if log and str(log) not in run.logs:
            run.logs.append(str(log))
        run.reason = run.reason or entry.get("reason") or "the launcher reported the job as failed"
    elif status in ("skipped", "cancelled"):
        run.state = "not run"
        run.reason = f"{status}: {entry.get('reason') or 'by the launcher'}"
        if log:
            run.logs.append(str(log))
    elif status in ("pending", "running", "waiting") and run.state != "failed":
        run.state = "incomplete"
        run.reason = f"{status} at the last launch"


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch logs written by dvclive (`dvclive/plots/metrics/<name>.tsv`, columns step and <name>)."""
    curves = {}
    for name in CURVES:
        path = run_dir / "dvclive" / "plots" / "metrics" / f"{name}.tsv"
        if not path.is_file():
            continue
        points = []
        with path.open(newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                try:
                    points.append((int(float(row["step"])), float(row[name])))
                except (KeyError, TypeError, ValueError):
                    continue
        curves[name] = points
    return curves
