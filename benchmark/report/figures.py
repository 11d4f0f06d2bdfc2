"""Leaderboard figures (matplotlib, Agg canvas, no display): accuracy against OPs, and val top-1 per epoch."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from benchmark.report.render import method_label


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def _label(e: dict[str, Any]) -> str:
    """Method, seeds, and a warning where the number is not a full-recipe result."""
    label = f"{method_label(e)} (n={e['n']})"
    if e["schedule"] == "short":
        label += ", short schedule"
    elif e["n"] == 0:
        label += f", {e['status']}"
    return label


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def accuracy_vs_ops(table: dict[str, Any], published: list[dict[str, Any]], path: Path) -> None:
    """One point per method (mean test top-1, error bar = std over seeds; a cross for a short schedule) at its OPs;
    published numbers of the same dataset and architecture that carry OPs as hollow squares."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    plotted = 0
    for i, e in enumerate(table["rows"]):
        ops = (e["cost"] or {}).get("ops")
        if ops is None or e["test_top1"]["mean"] is None:
            continue
        color = f"C{i % 10}"
        ax.errorbar([ops], [e["test_top1"]["mean"]], yerr=[e["test_top1"]["std"] or 0.0],
                    fmt="x" if e["schedule"] == "short" else "o", color=color, capsize=3, label=_label(e))
        plotted += 1
    for row in published:
        if row["dataset"] == table["dataset"] and row["arch"] == table["arch"] and row["ops"] and row["top1"]:
            ax.plot([row["ops"]], [row["top1"]], marker="s", mfc="none", color="0.3", linestyle="none")
            ax.annotate(f"{row['method']} published [{row['mark']}]", (row["ops"], row["top1"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
            plotted += 1
    if plotted:
        ax.set_xscale("log")
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no OPs available\n(benchmark.ops missing or failed for these runs)", ha="center",
                va="center", transform=ax.transAxes)
    ax.set_xlabel("OPs = BOPs/64 + FLOPs")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{table['dataset']} · {table['arch']}: accuracy against OPs")
    ax.grid(True, alpha=0.3)
    _save(fig, path)


def training_curves(table: dict[str, Any], path: Path) -> bool:
    """Val top-1 per epoch, one colour per method and one line per seed; False when no run has logs."""
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    drawn = False
    for i, e in enumerate(table["rows"]):
        for j, (seed, curve) in enumerate(e["curves"].items()):
            ax.plot(curve["epoch"], curve["val_top1"], color=f"C{i % 10}", marker=".", alpha=0.85,
                    label=_label(e) if j == 0 else None)
            drawn = True
    if not drawn:
        return False
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{table['dataset']} · {table['arch']}: training curves (one line per seed)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)
    return True


def write_figures(board: dict[str, Any], published: list[dict[str, Any]], folder: Path) -> dict[str, list[str]]:
    """Every figure of the leaderboard into `folder`; returns, per 'dataset/arch', the paths relative to the
    folder's parent (as the markdown links them)."""
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, list[str]] = {}
    for table in board["tables"]:
        key = f"{table['dataset']}/{table['arch']}"
        stem = _slug(f"{table['dataset']}_{table['arch']}")
        if any(e["n"] for e in table["rows"]):
            accuracy_vs_ops(table, published, folder / f"{stem}_acc_vs_ops.png")
            made.setdefault(key, []).append(f"figures/{stem}_acc_vs_ops.png")
        if training_curves(table, folder / f"{stem}_curves.png"):
            made.setdefault(key, []).append(f"figures/{stem}_curves.png")
    return made
