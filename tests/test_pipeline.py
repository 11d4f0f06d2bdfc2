"""The DVC pipeline end to end on a tiny grid, in a temporary copy of the project: prepare → launch → report,
then a second `dvc repro` that does nothing, then a one-method params change that retrains only that method."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {"epochs": 1, "batch_size": 32, "max_batches": 2, "eval_max_batches": 1, "workers": 0}


def _copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], cwd=dest, check=True)


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(["dvc", *args], cwd=project, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_dvc_repro_tiny_grid_then_noop_then_one_method(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    _copy_project(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["grid"].update({"archs": ["resnet20"], "methods": ["fp", "xnor"], "seeds": [0]})
    params["overrides"]["fashion-mnist"] = TINY
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    _dvc(project, "repro")
    board = (project / "leaderboard.md").read_text()
    assert "xnor" in board and "fp" in board
    runs = project / "runs" / "fashion-mnist" / "resnet20"
    for name in ("fp", "xnor"):
        assert (runs / name / "seed0" / "metrics.json").is_file()
    summary = json.loads((project / "leaderboard.json").read_text())["summary"]
    assert any(k.endswith("xnor/seed0/test_top1") for k in summary)
    shown = _dvc(project, "metrics", "show", "--json")
    assert "leaderboard.json" in shown.stdout
    plots = _dvc(project, "plots", "show", "--json").stdout
    assert "figures/" in plots and ".png" in plots, plots[:2000]

    fp_mtime = (runs / "fp" / "seed0" / "metrics.json").stat().st_mtime_ns
    again = _dvc(project, "repro")
    assert "Data and pipelines are up to date" in again.stdout + again.stderr

    params["method_overrides"] = {**(params.get("method_overrides") or {}), "xnor": {"lr_scale": 0.5}}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    xnor_before = json.loads((runs / "xnor" / "seed0" / "metrics.json").read_text())["hash"]
    _dvc(project, "repro")
    assert (runs / "fp" / "seed0" / "metrics.json").stat().st_mtime_ns == fp_mtime  # fp not retrained
    assert json.loads((runs / "xnor" / "seed0" / "metrics.json").read_text())["hash"] != xnor_before
