"""The leaderboard as data: runs grouped per dataset x architecture x method, seeds aggregated, each group matched
with its published number, costed with `benchmark.ops`, and given a status.

A verdict (`reproduced` / `below published`) needs a published number of the same setting that is not
[unverified], a full-length schedule and a full test set; otherwise the status says why there is none.
"""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from tqdm import tqdm

from benchmark.errors import BitbenchError
from benchmark.report.collect import Run
from benchmark.report.published import MARKS, VERDICT_MARKS, match_published

STATUSES = ("reproduced", "below published", "published number unverified", "short schedule (no verdict)",
            "no verdict", "no published number", "incomplete", "failed", "not run")
COMPARE = {"final": "test_top1", "best-val": "test_top1_at_best_val"}
AGGREGATED = ("test_top1", "test_top5", "test_top1_at_best_val", "test_top5_at_best_val", "val_top1",
              "best_val_top1", "wall_seconds", "train_seconds", "images_per_second")
COST_KEYS = ("ops", "bops", "flops", "params", "binary_params", "fp_params", "packed_bytes")
_COST_CACHE: dict = {}  # counting builds the model (seconds at 224 px): once per setting and process


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; None for a single value) of the finished seeds."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def full_recipe_epochs(method: str, variant: str | None, dataset: str, config: dict[str, Any] | None) -> float | None:
    """Length of the method's unscaled recipe for this dataset: from the registry
    (`benchmark.runs.resolve_recipe(..., {})`), else from the run's own recipe when it was not shortened."""
    try:
        from benchmark.runs import resolve_recipe

        return float(resolve_recipe(method, variant, dataset, {}).epochs)
    except Exception:  # noqa: BLE001 - no registry, or a method it does not know: fall back to the config
        pass
    config = config or {}
    stages = (config.get("recipe") or {}).get("stages")
    if stages and "epochs" not in (config.get("overrides") or {}):
        try:
            return float(sum(float(s["epochs"]) for s in stages))
        except (KeyError, TypeError, ValueError):
            return None
    return None


def data_epochs(metrics: dict[str, Any]) -> float | None:
    """Epochs of training data a finished run went through: its recipe length (`recipe_epochs`), rounded to
    three decimals; the engine's `epochs` counts evaluation rounds, several per epoch when stages are fractional
    (BiTAT's 4 stages of 0.8 epochs are 5 rounds). Older runs without `recipe_epochs`: `epochs`."""
    value = metrics.get("recipe_epochs", metrics.get("epochs"))
    return None if value is None else round(float(value), 3)


def run_schedule(run: Run) -> dict[str, Any]:
    """Whether a finished run used the full recipe: `full`, `short` (fewer epochs than the paper recipe, or capped
    batches per epoch) or `unknown`; plus reasons its test number cannot be compared (partial test set...)."""
    config, metrics = run.config or {}, run.metrics or {}
    overrides = config.get("overrides") or {}
    full = full_recipe_epochs(run.method, run.variant, run.dataset, config)
    ran = data_epochs(metrics)
    planned = metrics.get("recipe_epochs")
    details, blockers = [], []
    kind = "full"
    if full is None:
        kind = "unknown"
        details.append("full recipe length unknown")
    elif (ran is not None and ran < full - 1e-6) or (planned is not None and planned < full - 1e-6):
        kind = "short"
        details.append(f"{_num(planned if planned is not None else ran)} of {_num(full)} epochs")
    if overrides.get("max_batches"):
        kind = "short"
        details.append(f"max_batches={overrides['max_batches']}")
    if overrides.get("eval_max_batches"):
        blockers.append(f"partial test set (eval_max_batches={overrides['eval_max_batches']})")
    if overrides.get("image_size"):
        blockers.append(f"image size overridden ({overrides['image_size']})")
    return {"kind": kind, "detail": "; ".join(details), "full_epochs": full, "blockers": blockers}


def _num(x: float) -> str:
    return f"{x:g}"


def count_cost(method: str, arch: str, config: dict[str, Any] | None, variant: str | None,
               cache: dict = _COST_CACHE) -> tuple[dict[str, Any] | None, str | None]:
    """OPs, BOPs, packed size... from `benchmark.ops.count_ops` at the run's classes / image size / channels;
    (None, why) when the module is missing or raises. Never invents a number."""
    config = config or {}
    try:
        key = (method, arch, int(config["num_classes"]), int(config["image_size"]),
               int(config.get("in_channels", 3)), variant)
    except (KeyError, TypeError, ValueError):
        return None, "run config has no num_classes / image_size"
    if key not in cache:
        try:
            from benchmark.ops import count_ops

            counts = count_ops(method, arch, key[2], key[3], in_channels=key[4], variant=variant)
            cache[key] = ({k: counts.get(k) for k in COST_KEYS}, None)
        except Exception as err:  # noqa: BLE001 - any failure of the counter shows as "-"
            lines = str(err).strip().splitlines()
            cache[key] = (None, f"{type(err).__name__}: {lines[0] if lines else ''}")
    return cache[key]


def group_entry(runs: list[Run], published: list[dict[str, Any]], tolerance: float, compare: str) -> dict[str, Any]:
    """One leaderboard row: a method (and variant) on one dataset x architecture, over its seeds."""
    first = runs[0]
    finished = [r for r in runs if r.state == "finished"]
    with_config = next((r for r in finished + runs if r.config), None)
    variant = next((r.variant for r in finished + runs if r.variant), None)
    method = with_config.method if with_config else first.method
    entry: dict[str, Any] = {
        "dataset": first.dataset, "arch": first.arch, "name": first.name, "method": method, "variant": variant,
        "in_grid": any(r.in_grid for r in runs), "seeds": sorted(r.seed for r in runs),
        "runs": [{"seed": r.seed, "state": r.state, "run_dir": str(r.run_dir), "in_grid": r.in_grid,
                  "logs": r.logs, "reason": r.reason} for r in sorted(runs, key=lambda r: r.seed)],
    }
    for key in AGGREGATED:
        entry[key] = mean_std([r.metrics.get(key) for r in finished])
    entry["epochs"] = mean_std([data_epochs(r.metrics) for r in finished])
    entry["n"] = len(finished)
    entry["devices"] = sorted({str(r.metrics.get("device")) for r in finished if r.metrics.get("device")})
    entry["world_sizes"] = sorted({int(r.metrics["world_size"]) for r in finished if r.metrics.get("world_size")})

    row, others = match_published(published, first.dataset, first.arch, method, variant)
    entry["published"] = None if row is None else {k: row.get(k) for k in (
        "key", "top1", "top5", "top5_mark", "mark", "source", "setting", "note", "ops", "ops_source", "ops_mark")}
    entry["also_published"] = [r["key"] for r in others]
    entry["context_published"] = [r["key"] for r in published if r["context"] and r["dataset"] == first.dataset
                                   and r["method"] == method]

    schedules = [run_schedule(r) for r in finished]
    kinds = {s["kind"] for s in schedules}
    entry["schedule"] = ("short" if "short" in kinds else "unknown" if "unknown" in kinds else
                         "full" if kinds else None)
    entry["schedule_detail"] = "; ".join(sorted({s["detail"] for s in schedules if s["detail"]}))
    entry["full_epochs"] = next((s["full_epochs"] for s in schedules if s["full_epochs"] is not None), None)
    blockers = sorted({b for s in schedules for b in s["blockers"]})

    cost, why = (count_cost(method, first.arch, with_config.config, variant) if with_config
                 else (None, "no run config"))
    entry["cost"], entry["cost_error"] = cost, why

    measured = entry[COMPARE[compare]]["mean"]
    pub_top1 = row["top1"] if row else None
    entry["diff"] = None if measured is None or pub_top1 is None else measured - pub_top1
    entry["status"], entry["status_detail"] = _status(runs, finished, row, entry, blockers, tolerance)
    entry["logs"] = [log for r in runs for log in r.logs]
    entry["curves"] = {str(r.seed): {"epoch": [step + 1 for step, _ in r.curves["val_top1"]],
                                     "val_top1": [v for _, v in r.curves["val_top1"]]}
                       for r in sorted(runs, key=lambda r: r.seed) if r.curves.get("val_top1")}
    return entry


def _status(runs: list[Run], finished: list[Run], row: dict | None, entry: dict, blockers: list[str],
            tolerance: float) -> tuple[str, str]:
    failed = [r for r in runs if r.state == "failed"]
    unfinished = [r for r in runs if r.state in ("incomplete", "not run")]
    notes = []
    if finished and failed:
        notes.append(f"{len(failed)} of {len(runs)} seeds failed")
    if finished and unfinished:
        notes.append(f"{len(unfinished)} of {len(runs)} seeds not finished")
    if not finished:
        if failed:
            reason = failed[0].reason or ""
            return "failed", f"{len(failed)} of {len(runs)} seeds failed: {reason}".strip()
        incomplete = [r for r in runs if r.state == "incomplete"]
        if incomplete:
            return "incomplete", incomplete[0].reason or ""
        return "not run", "; ".join(f"seed {r.seed} {r.reason}" for r in runs if r.reason)
    if row is None or row["top1"] is None:
        status = "no published number"
        notes.insert(0, (row or {}).get("note") or "")
    elif row["mark"] not in VERDICT_MARKS:
        status = "published number unverified"
    elif entry["schedule"] == "short":
        status = "short schedule (no verdict)"
    elif entry["schedule"] != "full":
        status = "no verdict"
        notes.insert(0, "full recipe length unknown")
    elif blockers:
        status = "no verdict"
        notes.insert(0, "; ".join(blockers))
    else:
        status = "reproduced" if entry["diff"] >= -tolerance else "below published"
    return status, "; ".join(n for n in notes if n)


def build_leaderboard(runs: list[Run], published: list[dict[str, Any]], tolerance: float = 1.0,
                      compare: str = "final", progress: bool = True) -> dict[str, Any]:
    """Tables (dataset x architecture, in grid order then the rest), per-run records, unmatched published rows of
    the datasets shown (context), status counts and a flat `summary` of per-run test top-1 (a DVC metrics file)."""
    if compare not in COMPARE:
        raise BitbenchError(f"unknown comparison {compare!r} (valid: {', '.join(COMPARE)})")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise BitbenchError(f"tolerance must be a non-negative number of points, got {tolerance}")
    groups: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in runs:  # grid runs first, in grid order, then the rest as found
        groups[run.group].append(run)
    order = sorted(groups, key=lambda g: (not any(r.in_grid for r in groups[g]), _first_index(runs, g)))
    tables: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for key in tqdm(order, desc="report", unit="method", disable=None if progress else True,
                    leave=False):
        tables.setdefault(key[:2], []).append(group_entry(groups[key], published, tolerance, compare))

    used = {e["published"]["key"] for rows in tables.values() for e in rows if e["published"]}
    datasets = list(dict.fromkeys(ds for ds, _ in tables))
    context = {ds: [r for r in published if r["dataset"] == ds and r["key"] not in used] for ds in datasets}
    methods = {e["method"] for rows in tables.values() for e in rows}
    anywhere = [r for r in published if r["dataset"] == "any" and r["method"] in methods and r["key"] not in used]
    if anywhere:
        context["any"] = anywhere
    statuses = [e["status"] for rows in tables.values() for e in rows]
    counts = {s: statuses.count(s) for s in STATUSES if s in statuses}
    run_counts: dict[str, int] = {}
    for run in runs:
        run_counts[run.state] = run_counts.get(run.state, 0) + 1
    summary = {f"{r.label}/test_top1": r.metrics.get("test_top1") for r in runs if r.state == "finished"}
    return {
        "tolerance": tolerance, "compare": compare, "compare_metric": COMPARE[compare], "marks": MARKS,
        "summary": summary, "counts": counts, "run_counts": run_counts,
        "tables": [{"dataset": ds, "arch": arch, "rows": rows} for (ds, arch), rows in tables.items()],
        "context": context,
    }


def _first_index(runs: list[Run], group: tuple[str, str, str]) -> int:
    return next(i for i, r in enumerate(runs) if r.group == group)
