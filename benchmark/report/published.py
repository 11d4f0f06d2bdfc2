"""Published numbers (`benchmark/published.yaml`): load, check the schema, and find the row a run is compared with.

Every row names its source and a verification mark; a verdict is only ever computed against a row of the same
dataset, architecture and method (and variant, where the row names one) that is not a context row.
"""
from __future__ import annotations

import numbers
import re
from importlib import resources
from pathlib import Path
from typing import Any


from benchmark.errors import BitbenchError
from benchmark.yamlfile import read_yaml

# The legend of /work/shared/references/published.md, in order of preference when several rows match.
MARKS: dict[str, str] = {
    "paper": "transcribed from a paper's table (the table is named)",
    "code": "read in the official repository or its README",
    "quoted": "quoted by another paper or by maintainers; to be checked against the paper",
    "unverified": "not checked: shown, never used for a verdict",
}
VERDICT_MARKS = ("paper", "code", "quoted")
DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagenet")
ANY = "any"
NO_NUMBER = "no published number on file"

REQUIRED = ("key", "dataset", "arch", "method", "source", "mark")
OPTIONAL = ("variant", "setting", "top1", "top5", "top5_mark", "ops", "ops_source", "ops_mark", "context", "note")


def default_path() -> Path:
    return Path(str(resources.files("benchmark") / "published.yaml"))


def load_published(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Read and validate a published-numbers file (default: the one shipped with the package)."""
    path = Path(path) if path is not None else default_path()
    doc = read_yaml(path, "published numbers file")
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list):
        raise BitbenchError(f"{path} must be a mapping with a 'rows:' list")
    try:
        return validate_published(doc["rows"])
    except BitbenchError as err:
        raise BitbenchError(f"{path}: {err}") from None


def validate_published(rows: list[Any]) -> list[dict[str, Any]]:
    """Check every row (fields, marks, ranges, unique keys); return them with defaults filled in.

    Raises BitbenchError naming the first row and field at fault."""
    out, seen = [], set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BitbenchError(f"published row {i} is not a mapping")
        name = f"published row {i} ({row.get('key')!r})" if row.get("key") else f"published row {i}"
        unknown = set(row) - set(REQUIRED) - set(OPTIONAL)
        if unknown:
            raise BitbenchError(f"{name} has unknown field(s) {', '.join(sorted(unknown))}")
        for field in REQUIRED:
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise BitbenchError(f"{name} is missing {field!r} (a non-empty string)")
        for field in ("variant", "setting", "note", "ops_source"):
            if row.get(field) is not None and not isinstance(row[field], str):
                raise BitbenchError(f"{name}: {field!r} must be a string")
        if row["key"] in seen:
            raise BitbenchError(f"{name}: duplicate key {row['key']!r}")
        seen.add(row["key"])
        for field in ("mark", "top5_mark", "ops_mark"):
            if row.get(field) is not None and row[field] not in MARKS:
                raise BitbenchError(f"{name}: {field} {row[field]!r} is not in the legend ({', '.join(MARKS)})")
        if row["dataset"] not in DATASETS + (ANY,):
            raise BitbenchError(f"{name}: unknown dataset {row['dataset']!r} (valid: {', '.join(DATASETS)}, any)")
        for field in ("top1", "top5"):
            value = row.get(field)
            if value is not None and (not _is_number(value) or not 0 < value <= 100):
                raise BitbenchError(f"{name}: {field} {value!r} is not an accuracy in (0, 100]")
        if row.get("top1") is None and row.get("top5") is not None:
            raise BitbenchError(f"{name}: top5 given without top1")
        if row.get("top5") is not None and row["top5"] < row["top1"]:
            raise BitbenchError(f"{name}: top5 {row['top5']} is below top1 {row['top1']}")
        if row.get("top1") is not None and ANY in (row["dataset"], row["arch"]):
            raise BitbenchError(f"{name}: a number needs a known dataset and architecture, not 'any'")
        if row.get("ops") is not None:
            if not _is_number(row["ops"]) or not 0 < row["ops"] < 1e13:
                raise BitbenchError(f"{name}: ops {row['ops']!r} is not a positive count below 1e13")
            if not row.get("ops_source") or not row.get("ops_mark"):
                raise BitbenchError(f"{name}: ops needs its own ops_source and ops_mark")
        elif row.get("ops_source") or row.get("ops_mark"):
            raise BitbenchError(f"{name}: ops_source/ops_mark given without ops")
        if row.get("top5_mark") and row.get("top5") is None:
            raise BitbenchError(f"{name}: top5_mark given without top5")
        if row["mark"] == "paper" and not re.search(r"\btable\s*[0-9IVX]", row["source"], re.IGNORECASE):
            raise BitbenchError(f"{name}: a [paper] mark needs the table number in its source")
        if not isinstance(row.get("context", False), bool):
            raise BitbenchError(f"{name}: context must be true or false")
        out.append({**{f: None for f in OPTIONAL}, **row, "context": bool(row.get("context", False))})
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def mark_label(mark: str | None) -> str:
    return f"[{mark}]" if mark else ""


def match_published(rows: list[dict[str, Any]], dataset: str, arch: str, method: str,
                    variant: str | None) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The row a run of (dataset, arch, method, variant) is compared with, and the other rows of that setting.

    Context rows never match. A row naming a variant matches only that variant and is preferred; then rows with a
    number before rows without, then by mark (paper, code, quoted, unverified), then file order. When no row names
    the architecture, a numberless row for 'any' architecture (or dataset) of the method is returned so that its
    source and note are shown."""
    def same(row: dict[str, Any], allow_any: bool) -> bool:
        ok_ds = row["dataset"] == dataset or (allow_any and row["dataset"] == ANY)
        ok_arch = row["arch"] == arch or (allow_any and row["arch"] == ANY)
        ok_variant = row["variant"] is None or row["variant"] == variant
        return not row["context"] and row["method"] == method and ok_ds and ok_arch and ok_variant

    order = list(MARKS)
    candidates = [r for r in rows if same(r, allow_any=False)]
    if not candidates:
        candidates = [r for r in rows if same(r, allow_any=True)]
    if not candidates:
        return None, []
    ranked = sorted(enumerate(candidates), key=lambda ir: (ir[1]["variant"] is None, ir[1]["top1"] is None,
                                                           order.index(ir[1]["mark"]), ir[0]))
    best = ranked[0][1]
    return best, [r for _, r in ranked[1:]]
