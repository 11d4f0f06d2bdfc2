"""The leaderboard as text: `leaderboard.md` for people, the short summary printed by `bitbench report`."""
from __future__ import annotations

from typing import Any

from benchmark.report.published import NO_NUMBER, mark_label

DASH = "–"


def fmt_acc(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return DASH
    return f"{stat['mean']:.2f}" if stat["std"] is None else f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def fmt_count(x: float | None) -> str:
    """1.63e8 -> '163 M'."""
    if x is None:
        return DASH
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.3g}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return DASH
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return DASH
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def method_label(e: dict[str, Any]) -> str:
    label = e["name"]
    if e["variant"] and not label.endswith(f"-{e['variant']}"):
        label += f" ({e['variant']})"
    return label + ("" if e["in_grid"] else " †")


def published_cells(e: dict[str, Any]) -> tuple[str, str]:
    pub = e["published"]
    if pub is None:
        n = len(e["context_published"])
        return (NO_NUMBER + (f" ({n} context row(s) below)" if n else "")), DASH
    source = pub["source"] + (f" — {pub['setting']}" if pub.get("setting") else "")
    if pub["top1"] is None:
        note = f" ({pub['note']})" if pub.get("note") else ""
        return NO_NUMBER + note, source
    return f"{pub['top1']:g} {mark_label(pub['mark'])}", source


def status_cell(e: dict[str, Any]) -> str:
    text = e["status"]
    if e["status_detail"]:
        text += f": {e['status_detail']}"
    if e["status"] == "failed" and e["logs"]:
        text += f" (log: `{e['logs'][0]}`)"
    return text


def table_rows(rows: list[dict[str, Any]]) -> list[str]:
    head = ["method", "schedule", "n", "test top-1", "test top-5", "top-1 @best val", "published top-1",
            "published source", "Δ", "OPs", "BOPs", "packed", "epochs", "wall / run", "device", "status"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in rows:
        pub, source = published_cells(e)
        cost = e["cost"] or {}
        schedule = e["schedule"] or DASH
        if e["schedule_detail"]:
            schedule += f" ({e['schedule_detail']})"
        epochs = DASH if e["epochs"]["mean"] is None else f"{e['epochs']['mean']:g}"
        if e["full_epochs"] is not None and e["epochs"]["mean"] is not None:
            epochs += f" / {e['full_epochs']:g}"
        device = ", ".join(e["devices"]) or DASH
        if e["world_sizes"]:
            device += " × " + "/".join(str(w) for w in e["world_sizes"])
        values = [method_label(e), schedule, f"{e['n']}/{len(e['seeds'])}", fmt_acc(e["test_top1"]),
                  fmt_acc(e["test_top5"]), fmt_acc(e["test_top1_at_best_val"]), pub, source,
                  DASH if e["diff"] is None else f"{e['diff']:+.2f}", fmt_count(cost.get("ops")),
                  fmt_count(cost.get("bops")), fmt_bytes(cost.get("packed_bytes")), epochs,
                  fmt_seconds(e["wall_seconds"]["mean"]), device, status_cell(e)]
        out.append("| " + " | ".join(cell(v) for v in values) + " |")
    return out


def problems(rows: list[dict[str, Any]]) -> list[str]:
    """One line per seed that did not finish: its state, reason and logs."""
    out = []
    for e in rows:
        for r in e["runs"]:
            if r["state"] == "finished":
                continue
            line = f"- `{e['name']}` seed {r['seed']}: **{r['state']}**"
            if r["reason"]:
                line += f" — {cell(r['reason'])}"
            if r["logs"]:
                line += " — log: " + ", ".join(f"`{log}`" for log in r["logs"])
            elif r["state"] == "not run":
                line += f" (expected at `{r['run_dir']}`)"
            out.append(line)
    return out


def render_markdown(board: dict[str, Any], runs_root: str, params: str | None, figures: dict[str, list[str]]) -> str:
    tol, compare = board["tolerance"], board["compare"]
    metric = "final-epoch test top-1" if compare == "final" else "test top-1 of the best-on-val epoch"
    counts = ", ".join(f"{n} {s}" for s, n in board["counts"].items()) or "nothing to report"
    run_counts = ", ".join(f"{n} {s}" for s, n in board["run_counts"].items()) or "none"
    lines = [
        "# bitbench leaderboard", "",
        f"Runs from `{runs_root}`" + (f", expected grid from `{params}`" if params else ", no grid given") +
        f". Verdicts compare the {metric} with the published top-1; tolerance **{tol:g} point(s)**.", "",
        f"**Methods:** {counts}. **Runs (seeds):** {run_counts}.", "",
        "How to read it:",
        "- **test top-1 / top-5**: final-epoch accuracy (%) on the test split, mean ± sample standard deviation "
        "(n − 1) over the finished seeds; **n** is finished / expected seeds. For 10-class datasets top-5 is near "
        "100 and says little.",
        "- **top-1 @best val**: test top-1 of the epoch with the best val top-1 (val is held out of train).",
        "- **published top-1**: from `benchmark/published.yaml`, with its source and verification mark: " +
        "; ".join(f"[{m}] {text}" for m, text in board["marks"].items()) + ". A row is matched on dataset + "
        "architecture + method (+ variant where the row names one); a number of another setting is never used.",
        f"- **Δ**: measured minus published top-1, in points. **reproduced**: Δ ≥ −{tol:g}; "
        f"**below published**: Δ < −{tol:g}.",
        "- **No verdict** against an [unverified] number (`published number unverified`), for a run shorter than "
        "the method's full recipe (`short schedule (no verdict)`: these numbers come from the short embedded "
        "default, not from the paper recipe), or for a partial test set.",
        "- **schedule**: `full` = the method's full recipe length for this dataset "
        "(`benchmark.runs.resolve_recipe` without overrides); `short` = fewer epochs or capped batches per epoch. "
        "**epochs**: trained / full recipe.",
        "- **OPs** = BOPs/64 + FLOPs at the run's image size and class count, **packed** = size of the bit-packed "
        "model, both from `benchmark.ops.count_ops`; – where not available.",
        "- † = a run directory outside the expected grid.", "",
    ]
    for table in board["tables"]:
        ds, arch, rows = table["dataset"], table["arch"], table["rows"]
        lines += [f"## {ds} · {arch}", ""] + table_rows(rows) + [""]
        for path in figures.get(f"{ds}/{arch}", []):
            lines.append(f"![{path}]({path})")
        if figures.get(f"{ds}/{arch}"):
            lines.append("")
        bad = problems(rows)
        if bad:
            lines += ["Runs that did not finish:", ""] + bad + [""]
        also = [(e["name"], k) for e in rows for k in e["also_published"]]
        if also:
            lines.append("Other published rows of the same setting (not used; see the context tables): " +
                         ", ".join(f"{name}: `{key}`" for name, key in also) + ".")
            lines.append("")
    if any(board["context"].values()):
        lines += ["## Published context (never used for a verdict)", "",
                  "Rows of `benchmark/published.yaml` for the datasets above that no row of the leaderboard is "
                  "compared with: other architectures or settings, full-precision ceilings, third-party "
                  "reproductions.", ""]
        for ds, rows in board["context"].items():
            if not rows:
                continue
            lines += [f"### {ds}", "", "| method | arch | setting | top-1 | top-5 | source | mark | note |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rows:
                top1 = NO_NUMBER if r["top1"] is None else f"{r['top1']:g}"
                top5 = DASH if r["top5"] is None else f"{r['top5']:g}" + (
                    f" {mark_label(r['top5_mark'])}" if r.get("top5_mark") else "")
                note = "; ".join(x for x in (r.get("note") or "", "context only" if r["context"] else "") if x)
                values = [r["method"], r["arch"], r.get("setting") or "", top1, top5, r["source"],
                          mark_label(r["mark"]), note]
                lines.append("| " + " | ".join(cell(v) for v in values) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_summary(board: dict[str, Any]) -> str:
    """A few lines for the terminal: status counts, then one line per dataset x architecture."""
    counts = ", ".join(f"{n} {s}" for s, n in board["counts"].items()) or "nothing to report"
    lines = [f"leaderboard: {counts}"]
    for table in board["tables"]:
        parts = []
        for e in table["rows"]:
            acc = "" if e["test_top1"]["mean"] is None else f" {fmt_acc(e['test_top1'])} (n={e['n']})"
            parts.append(f"{method_label(e)}{acc} {e['status']}")
        lines.append(f"  {table['dataset']}/{table['arch']}: " + "; ".join(parts))
    return "\n".join(lines)
