"""`bitbench perf pipeline`: wall time of the default `dvc repro`, cold then warm, on a fresh copy of the project.

The project's tracked files (`git ls-files`, as they are in the working tree) are copied into a temporary
folder and committed there as a fresh clone would be, so nothing is prepared or trained yet (cold); a second
`dvc repro` must then find every stage up to date (warm). The copy's own code runs (it goes first on
PYTHONPATH), with this interpreter's `bitbench` and `dvc`. `--params` swaps in a smaller params file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark.errors import BitbenchError

PROJECT = Path(__file__).resolve().parents[2]
STAGE_RUN = re.compile(r"Running stage '([^']+)'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", metavar="FILE", help="params file used as the copy's params.yaml "
                                                         "(default: the project's params.yaml)")
    parser.add_argument("--project", metavar="DIR", default=str(PROJECT),
                        help="git checkout to copy (default: the one this bitbench runs from)")
    parser.add_argument("--keep", action="store_true", help="keep the copy (its path is in the JSON)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="give up on a `dvc repro` after S seconds (default: no limit)")


def tracked_files(project: Path) -> list[str]:
    """The project's tracked files that exist in its working tree (`git ls-files`)."""
    try:
        out = subprocess.run(["git", "-C", str(project), "ls-files", "-z"], capture_output=True, check=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise BitbenchError(f"{project} is not a git checkout (git ls-files failed)") from err
    files = [f for f in out.decode().split("\0") if f and (project / f).is_file()]
    if "dvc.yaml" not in files:
        raise BitbenchError(f"{project} has no tracked dvc.yaml")
    return files


def copy_project(project: Path, dest: Path, params: Path | None) -> None:
    """Tracked files of `project` into `dest`, `params` as its params.yaml, committed in a new git repository
(as in a fresh clone)."""
    for rel in tracked_files(project):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / rel, target)
    if params is not None:
        shutil.copyfile(params, dest / "params.yaml")
    git = ["git", "-C", str(dest), "-c", "user.name=bitbench", "-c", "user.email=bitbench@localhost",
           "-c", "commit.gpgsign=false"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "bitbench perf pipeline copy"]):
        subprocess.run(git + cmd, check=True, capture_output=True, timeout=120)  # dvclive needs a commit


def tool_env(copy: Path) -> dict[str, str]:
    """This interpreter's scripts first on PATH, the copy first on PYTHONPATH, no DVC analytics."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def repro(copy: Path, log: Path, env: dict[str, str], timeout: float | None) -> dict:
    """One `dvc repro` in `copy`: wall time and the stages it ran; its output goes to `log`."""
    dvc = shutil.which("dvc", path=env["PATH"])
    if dvc is None:
        raise BitbenchError("dvc is not installed in this environment")
    start = time.perf_counter()
    with log.open("w") as out:
        try:
            proc = subprocess.run([dvc, "repro"], cwd=copy, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise BitbenchError(f"dvc repro ran past --timeout {timeout:g} s (log: {log})") from err
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise BitbenchError(f"dvc repro failed with exit code {proc.returncode} (log: {log})")
    return {"wall_s": wall, "stages_run": STAGE_RUN.findall(log.read_text())}


def measure(project: Path, params: Path | None = None, keep: bool = False, timeout: float | None = None) -> dict:
    """Cold and warm `dvc repro` wall times of a fresh copy of `project`."""
    project = project.resolve()
    if params is not None:
        from benchmark.runs import load_params

        load_params(params)  # missing, malformed or grid-less params fail before anything is copied
    tracked_files(project)  # a project that cannot be copied fails before anything is created
    copy = Path(tempfile.mkdtemp(prefix="bitbench-pipeline-"))
    logs = copy.parent / f"{copy.name}-logs"
    failed_repro = False
    try:
        copy_project(project, copy, params.resolve() if params else None)
        env = tool_env(copy)
        logs.mkdir()
        failed_repro = True  # from here on a failure keeps the copy and its logs for inspection
        cold = repro(copy, logs / "cold.log", env, timeout)
        warm = repro(copy, logs / "warm.log", env, timeout)
        failed_repro = False
    finally:
        if not keep and not failed_repro:
            shutil.rmtree(copy, ignore_errors=True)
            shutil.rmtree(logs, ignore_errors=True)
    return {
        "project": str(project), "params": str(params or project / "params.yaml"),
        "copy": str(copy) if keep else None,
        "cold": cold, "warm": warm, "warm_is_noop": not warm["stages_run"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
    }


def run(args: argparse.Namespace) -> int:
    result = measure(Path(args.project), Path(args.params) if args.params else None, args.keep, args.timeout)
    print(json.dumps(result, indent=2))
    return 0
