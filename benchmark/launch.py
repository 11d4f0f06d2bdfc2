"""`bitbench launch`: run a grid of training runs in parallel through submitit, locally or on a SLURM cluster.

Every cell is resolved and checked before anything is submitted. Runs already finished with the same config
hash are skipped; runs that need another run (the `fp` teacher or starting point) wait until it has finished.
Ready runs go out together (one SLURM job array, or up to `array_parallelism` local jobs at a time); a failed run
is reported with its log and does not stop the others. The summary lands in `<runs_root>/launch-summary.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import submitit
from tqdm import tqdm

from benchmark.errors import BitbenchError
from benchmark.yamlfile import read_yaml

EXECUTORS = ("local", "slurm", "debug")
PROFILE_TYPES: dict[str, tuple[type, ...]] = {
    "executor": (str,), "partition": (str,), "account": (str,), "qos": (str,), "constraint": (str,),
    "nodes": (int,), "gpus_per_node": (int,), "tasks_per_node": (int,), "cpus_per_task": (int,),
    "mem_gb": (int, float), "timeout_min": (int,), "array_parallelism": (int,), "signal_delay_s": (int,),
    "max_num_timeout": (int,), "additional_parameters": (dict,), "setup": (list,), "checkpoint_steps": (int,),
}
PROFILE_DEFAULTS: dict[str, Any] = {
    "executor": "local", "partition": None, "account": None, "qos": None, "constraint": None, "nodes": 1,
    "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": None, "mem_gb": None, "timeout_min": 1440,
    "array_parallelism": 2, "signal_delay_s": 90, "max_num_timeout": 3, "additional_parameters": {}, "setup": [],
    "checkpoint_steps": 0,
}
# Per-rank timings legitimately differ between the tasks of one run; everything else must agree.
TIMING_KEYS = frozenset({"wall_seconds", "train_seconds", "images_per_second"})
FINAL = frozenset({"done", "cached", "failed", "skipped", "cancelled"})
SUMMARY = "launch-summary.json"


# ----------------------------------------------------------------------------------------------- profiles
def profile_dirs() -> list[Path]:
    """Where profiles are looked up by name: ./slurm/profiles, then the checkout's slurm/profiles."""
    dirs = [Path.cwd() / "slurm" / "profiles", Path(__file__).resolve().parents[1] / "slurm" / "profiles"]
    return list(dict.fromkeys(d.resolve() for d in dirs))


def load_profile(profile: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A cluster profile (a name under slurm/profiles/, a YAML path, or a dict), checked and with defaults filled."""
    if isinstance(profile, dict):
        raw, name, where = dict(profile), str(profile.get("name", "custom")), "profile"
    else:
        path = Path(profile)
        if not (path.suffix in (".yaml", ".yml") or path.is_file()):
            candidates = [d / f"{profile}.yaml" for d in profile_dirs()]
            path = next((c for c in candidates if c.is_file()), candidates[0])
            if not path.is_file():
                known = sorted({p.stem for d in profile_dirs() if d.is_dir() for p in d.glob("*.yaml")})
                raise BitbenchError(f"unknown launch profile {str(profile)!r} (known: {', '.join(known) or 'none'}; "
                                    f"or give the path of a YAML file)")
        raw = read_yaml(path, "launch profile") or {}
        if not isinstance(raw, dict):
            raise BitbenchError(f"launch profile {path} must be a mapping of settings")
        name, where = path.stem, str(path)
    raw.pop("name", None)
    unknown = sorted(set(raw) - set(PROFILE_TYPES))
    if unknown:
        raise BitbenchError(f"{where}: unknown setting(s) {', '.join(unknown)} (valid: {', '.join(PROFILE_TYPES)})")
    out = {**PROFILE_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}, "name": name}
    for key, types in PROFILE_TYPES.items():
        value = out[key]
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            wanted = " or ".join(t.__name__ for t in types)
            raise BitbenchError(f"{where}: {key} must be {wanted}, got {value!r}")
    if out["executor"] not in EXECUTORS:
        raise BitbenchError(f"{where}: executor must be one of {', '.join(EXECUTORS)}, got {out['executor']!r}")
    for key in ("nodes", "tasks_per_node", "timeout_min", "array_parallelism"):
        if out[key] < 1:
            raise BitbenchError(f"{where}: {key} must be at least 1, got {out[key]}")
    if out["checkpoint_steps"] < 0:
        raise BitbenchError(f"{where}: checkpoint_steps must be 0 (epoch ends only) or more, got {out['checkpoint_steps']}")
    if out["executor"] == "local" and out["nodes"] != 1:
        raise BitbenchError(f"{where}: the local executor runs on one node (nodes: 1), got nodes: {out['nodes']}")
    if out["executor"] == "debug" and out["nodes"] * out["tasks_per_node"] != 1:
        raise BitbenchError(f"{where}: the debug executor runs one process (nodes: 1, tasks_per_node: 1)")
    if not all(isinstance(line, str) for line in out["setup"]):
        raise BitbenchError(f"{where}: setup must be a list of shell lines")
    return out


def check_cluster(profile: dict[str, Any]) -> None:
    """For a SLURM profile: the cluster answers and has the profile's partition (else BitbenchError, nothing sent)."""
    if profile["executor"] != "slurm":
        return
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        raise BitbenchError(f"profile {profile['name']!r} needs SLURM's client commands (sbatch, sinfo) on PATH")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise BitbenchError("SLURM does not answer (sinfo timed out after 60 s)") from None
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("sinfo: ")
        raise BitbenchError(f"SLURM does not answer (sinfo: {why}); for the local test cluster: "
                            f"source slurm/local-cluster/env.sh && bash slurm/local-cluster/start.sh")
    partitions = set(out.stdout.split())
    if profile["partition"] and profile["partition"] not in partitions:
        raise BitbenchError(f"profile {profile['name']!r} asks for partition {profile['partition']!r}, which this "
                            f"cluster does not have (partitions: {', '.join(sorted(partitions)) or 'none'})")


def world_size(profile: dict[str, Any]) -> int:
    """Processes per run: one task per GPU (or per CPU share) on every node."""
    return profile["nodes"] * profile["tasks_per_node"]


def make_executor(profile: dict[str, Any], folder: str | Path) -> submitit.Executor:
    """A submitit executor configured from a loaded profile; job logs go under `folder` (one subfolder per job)."""
    folder = Path(folder) / "%j"
    if profile["executor"] == "debug":
        return submitit.DebugExecutor(folder)
    if profile["executor"] == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=profile["max_num_timeout"])
        # Concurrent local runs share this machine's cores: give each task its share of torch threads (CPU
        # oversubscription makes OpenMP threads spin against each other, ten times slower here).
        share = (os.cpu_count() or 1) // (profile["array_parallelism"] * profile["tasks_per_node"])
        os.environ.setdefault("BITBENCH_THREADS", str(max(1, share)))
        params = {"timeout_min": profile["timeout_min"], "nodes": 1, "tasks_per_node": profile["tasks_per_node"],
                  "gpus_per_node": profile["gpus_per_node"], "signal_delay_s": profile["signal_delay_s"],
                  "setup": list(profile["setup"])}
    else:
        ex = submitit.SlurmExecutor(folder, max_num_timeout=profile["max_num_timeout"])
        mem_gb = profile["mem_gb"]
        params = {
            "job_name": "bitbench", "partition": profile["partition"], "account": profile["account"],
            "qos": profile["qos"], "constraint": profile["constraint"], "time": profile["timeout_min"],
            "nodes": profile["nodes"], "ntasks_per_node": profile["tasks_per_node"],
            "cpus_per_task": profile["cpus_per_task"], "gpus_per_node": profile["gpus_per_node"] or None,
            "mem": None if mem_gb is None else f"{round(mem_gb * 1024)}M",
            "array_parallelism": profile["array_parallelism"], "signal_delay_s": profile["signal_delay_s"],
            "additional_parameters": dict(profile["additional_parameters"]) or None,
            "setup": list(profile["setup"]) or None,
            # one failed rank ends the run's other ranks instead of leaving them in a collective until the limit
            "srun_args": ["--kill-on-bad-exit=1"],
        }
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


# ----------------------------------------------------------------------------------------------- grid
def parse_method(entry: str) -> tuple[str, str | None]:
    """`method` or `method:variant`."""
    method, _, variant = str(entry).partition(":")
    if not method:
        raise BitbenchError(f"method entry {entry!r} is empty (use `method` or `method:variant`)")
    return method, variant or None


def grid_cells(datasets: list[str], archs: list[str], methods: list[str], seeds: list[int],
               data_root: str | Path = "data", overrides: dict[str, dict[str, Any]] | None = None,
               common_overrides: dict[str, Any] | None = None,
               method_overrides: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Grid cells (the spec `benchmark.runs.resolve_config` reads) for datasets x archs x methods x seeds.
    `overrides` maps a dataset to its recipe overrides, `method_overrides` a grid method entry (`method` or
    `method:variant`) to its own, applied after the dataset's; `common_overrides` apply to every cell, last."""
    for name, values in (("datasets", datasets), ("archs", archs), ("methods", methods), ("seeds", seeds)):
        if not values:
            raise BitbenchError(f"the grid has no {name}")
    overrides, method_overrides = overrides or {}, method_overrides or {}
    for key, values in (*overrides.items(), *method_overrides.items()):
        if not isinstance(values, dict):
            raise BitbenchError(f"overrides for {key!r} must be a mapping of key: value, got {values!r}")
    cells = []
    for dataset in datasets:
        for arch in archs:
            for entry in methods:
                method, variant = parse_method(entry)
                for seed in seeds:
                    if isinstance(seed, bool) or not isinstance(seed, int):
                        raise BitbenchError(f"seed {seed!r} is not an integer")
                    cells.append({"dataset": dataset, "data_dir": str(Path(data_root) / dataset), "arch": arch,
                                  "method": method, "variant": variant, "seed": seed,
                                  "overrides": {**overrides.get(dataset, {}), **method_overrides.get(entry, {}),
                                                **(common_overrides or {})}})
    return cells


# ----------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One grid cell on its way through the launcher."""

    name: str
    config: dict[str, Any]
    needs: list["Run"] = field(default_factory=list)
    status: str = "waiting"  # waiting | pending | running | done | cached | failed | skipped | cancelled | planned
    job: Any = None
    log: str | None = None
    reason: str | None = None
    metrics: dict[str, Any] | None = None
    ranks_agree: bool | None = None

    def record(self) -> dict[str, Any]:
        cfg = self.config
        return {"name": self.name, "status": self.status, "dataset": cfg["dataset"], "arch": cfg["arch"],
                "method": cfg["method"], "variant": cfg["variant"], "seed": cfg["seed"], "run_dir": cfg["run_dir"],
                "hash": cfg["hash"], "needs": [r.name for r in self.needs],
                "job_id": None if self.job is None else str(self.job.job_id), "log": self.log,
                "reason": self.reason, "ranks_agree": self.ranks_agree, "metrics": self.metrics}


def plan(cells: list[dict[str, Any]], profile: dict[str, Any], runs_root: str | Path) -> list[Run]:
    """Resolve every cell (all errors surface here, before any submission), link dependencies, mark cached runs."""
    from benchmark.runs import dependencies, is_finished, resolve_config, run_dir_for, set_dependency_hash

    runs_root = Path(runs_root).resolve()
    runs: dict[str, Run] = {}
    for cell in cells:
        spec = dict(cell)
        spec["data_dir"] = str(Path(spec["data_dir"]).resolve()) if spec.get("data_dir") else None
        spec.setdefault("world_size", world_size(profile))
        spec.setdefault("checkpoint_steps", profile["checkpoint_steps"])  # not hashed: when to save, not what
        if not spec.get("run_dir"):
            for key in ("dataset", "arch", "method"):
                if not spec.get(key):
                    raise BitbenchError(f"grid cell {cell} is missing {key!r}")
            spec["run_dir"] = run_dir_for(runs_root, spec["dataset"], spec["arch"], spec["method"],
                                          spec.get("variant"), spec.get("seed", 0))
        spec["run_dir"] = str(Path(spec["run_dir"]).resolve())
        cfg = resolve_config(spec, check_dependencies=False)
        if cfg["world_size"] != world_size(profile):
            raise BitbenchError(f"{cfg['run_dir']}: world size {cfg['world_size']} does not match profile "
                                f"{profile['name']!r} ({profile['nodes']} nodes x {profile['tasks_per_node']} tasks)")
        if cfg["recipe"]["batch_size"] % cfg["world_size"]:
            raise BitbenchError(f"{cfg['run_dir']}: batch size {cfg['recipe']['batch_size']} is not divisible by "
                                f"the world size {cfg['world_size']} of profile {profile['name']!r}")
        name = str(Path(cfg["run_dir"]).relative_to(runs_root)) if Path(cfg["run_dir"]).is_relative_to(runs_root) \
            else cfg["run_dir"]
        if name in runs:
            if runs[name].config["hash"] != cfg["hash"]:
                raise BitbenchError(f"run {name} appears twice in the grid with different settings")
            continue
        runs[name] = Run(name, cfg)
    by_dir = {r.config["run_dir"]: r for r in runs.values()}
    for run in runs.values():
        for dep in dependencies(run.config):
            dep = str(Path(dep).resolve())
            if dep in by_dir:
                run.needs.append(by_dir[dep])
            elif not (Path(dep) / "model.pt").is_file():
                raise BitbenchError(f"{run.name} needs the finished run {dep} (teacher or starting point), which "
                                    f"is neither finished nor in the grid: add its method to the grid")
    for run in _dependencies_first(list(runs.values())):
        for dep in run.needs:  # the hash a grid dependency will finish with, before it has run
            set_dependency_hash(run.config, dep.config["run_dir"], dep.config["hash"])
        if is_finished(run.config["run_dir"], run.config["hash"]):
            run.status = "cached"
            run.metrics = _read_json(Path(run.config["run_dir"]) / "metrics.json")
    return list(runs.values())


def _dependencies_first(runs: list[Run]) -> list[Run]:
    """`runs` ordered so that every run comes after the runs it needs; a cycle is an error."""
    ordered: list[Run] = []
    state: dict[str, str] = {}

    def visit(run: Run) -> None:
        if state.get(run.name) == "done":
            return
        if state.get(run.name) == "visiting":
            raise BitbenchError(f"run {run.name} depends on itself through its teacher or starting point")
        state[run.name] = "visiting"
        for dep in run.needs:
            visit(dep)
        state[run.name] = "done"
        ordered.append(run)

    for run in runs:
        visit(run)
    return ordered


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _set_aside_stale(run: Run) -> str | None:
    """A run directory left by another config of the same cell is moved to `.stale/` beside it (kept, not
    deleted), so the new config trains from scratch instead of tripping over the old checkpoint."""
    run_dir = Path(run.config["run_dir"])
    old = _read_json(run_dir / "config.json")
    if old is None or old.get("hash") == run.config["hash"]:
        return None
    target = run_dir.parent / ".stale" / f"{run_dir.name}-{old.get('hash', 'unknown')}-{int(time.time())}"
    target.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(target)
    return str(target)


# ----------------------------------------------------------------------------------------------- jobs
@contextlib.contextmanager
def _submission_env() -> Iterator[None]:
    """submitit's clean_env (no SLURM/torch.distributed variables of a surrounding job leak into the new jobs),
    keeping SLURM_CONF, which sbatch needs to find the cluster."""
    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf is not None:
            os.environ["SLURM_CONF"] = conf
        try:
            yield
        finally:
            os.environ.pop("SLURM_CONF", None)


def _task_jobs(job: Any) -> list[Any]:
    return list(job._sub_jobs) or [job]  # one handle per task (submitit keeps them private)


def _collect(run: Run) -> None:
    """Read a finished job's outcome from its result pickles: metrics, rank agreement, or the error and its log."""
    outcomes = []
    for task in _task_jobs(run.job):
        path = task.paths.result_pickle
        outcome = submitit.core.utils.pickle_load(path) if path.exists() else ("missing", None)
        outcomes.append((task, *outcome))
    failed = [(t, payload) for t, kind, payload in outcomes if kind == "error"]
    missing = [t for t, kind, _ in outcomes if kind == "missing"]
    if failed:
        task, trace = failed[0]
        lines = [ln.strip() for ln in str(trace).strip().splitlines() if ln.strip()]
        run.status, run.log = "failed", str(task.paths.stderr)
        run.reason = lines[-1] if lines else "the job raised an error"
        return
    if missing:
        run.status, run.log = "failed", str(missing[0].paths.stderr)
        run.reason = f"task {missing[0].task_id or 0} ended without a result (state: {_state(run.job)})"
        return
    results = [payload for _, _, payload in outcomes]
    comparable = [{k: v for k, v in r.items() if k not in TIMING_KEYS} if isinstance(r, dict) else r for r in results]
    run.ranks_agree = all(c == comparable[0] for c in comparable)
    run.metrics = results[0]
    run.log = str(_task_jobs(run.job)[0].paths.stderr)
    if run.ranks_agree:
        run.status = "done"
    else:
        run.status, run.reason = "failed", "the ranks returned different metrics"


def _slurm_finished(job: Any) -> bool:
    """Whether SLURM considers the job over. Its result files alone do not say so: the interrupted attempt of a
    requeued job (preemption, time limit) may leave an error result behind (submitit's own `scontrol requeue`
    can be killed by the requeue it asked for), which the next attempt replaces."""
    state = job.watcher.get_state(job.job_id, mode="cache").upper()
    if state == "UNKNOWN":  # no answer from sacct: the result files are all there is to go by
        return job.done()
    return job.watcher.is_done(job.job_id, mode="cache")


def _state(job: Any) -> str:
    try:
        return str(job.state).upper()
    except Exception:  # noqa: BLE001 - the state is informative only
        return "UNKNOWN"


class _Status:
    """Which runs are waiting, pending, running, done and failed: a tqdm bar on a terminal, else one line per change."""

    ORDER = ("planned", "waiting", "pending", "running", "done", "cached", "failed", "skipped", "cancelled")

    def __init__(self, runs: list[Run], quiet: bool = False):
        self.runs, self.quiet, self.last = runs, quiet, None
        self.tty = sys.stderr.isatty() and not quiet
        todo = sum(r.status != "cached" for r in runs)
        self.bar = tqdm(total=todo, desc="launch", unit="run", disable=not self.tty, file=sys.stderr, leave=False)

    def say(self, message: str) -> None:
        if not self.quiet:
            tqdm.write(f"launch: {message}", file=sys.stderr)

    def update(self) -> None:
        counts = {s: sum(r.status == s for r in self.runs) for s in self.ORDER}
        line = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        if self.tty:
            self.bar.n = sum(counts[s] for s in ("done", "failed", "skipped", "cancelled"))
            self.bar.set_postfix_str(line)
        elif line != self.last:
            self.say(line)
        self.last = line

    def close(self) -> None:
        self.bar.close()


class _Scheduler:
    """Submits ready runs (dependencies finished), polls the jobs, and settles each run's final status."""

    def __init__(self, runs: list[Run], profile: dict[str, Any], log_dir: Path, status: _Status, poll_s: float):
        self.runs, self.profile, self.status, self.poll_s, self.log_dir = runs, profile, status, poll_s, log_dir
        self.executor: submitit.Executor | None = None  # made at the first submission: no log folder otherwise
        self.active: list[Run] = []

    def step(self) -> bool:
        """One round: skip, submit, poll. False once every run has its final status."""
        self._skip_orphans()
        self._submit(self._ready())
        self._poll()
        self.status.update()
        return any(r.status not in FINAL for r in self.runs)

    def _skip_orphans(self) -> None:
        changed = True
        while changed:
            changed = False
            for run in self.runs:
                bad = [d for d in run.needs if d.status in ("failed", "skipped", "cancelled")]
                if run.status == "waiting" and bad:
                    what = {"failed": "failed", "skipped": "was skipped", "cancelled": "was cancelled"}[bad[0].status]
                    run.status, run.reason = "skipped", f"needs {bad[0].name}, which {what}"
                    self.status.say(f"skipped {run.name}: {run.reason}")
                    changed = True

    def _ready(self) -> list[Run]:
        ready = [r for r in self.runs if r.status == "waiting" and all(d.status in ("done", "cached") for d in r.needs)]
        if self.profile["executor"] != "slurm":  # no scheduler: cap the number of concurrent local jobs ourselves
            ready = ready[: max(0, self.profile["array_parallelism"] - len(self.active))]
        return ready

    def _submit(self, ready: list[Run]) -> None:
        if not ready:
            return
        from benchmark.train import TrainJob

        for run in ready:
            moved = _set_aside_stale(run)
            if moved:
                self.status.say(f"{run.name} held another config: moved it to {moved}")
        self.executor = self.executor or make_executor(self.profile, self.log_dir)
        try:
            with _submission_env():
                jobs = self.executor.submit_array([TrainJob(r.config) for r in ready])
        except Exception as err:  # noqa: BLE001 - e.g. sbatch refusing the job: these runs fail, others go on
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
            for run in ready:
                run.status, run.reason = "failed", f"submission failed: {lines[-1] if lines else type(err).__name__}"
                self.status.say(f"FAILED {run.name}: {run.reason}")
            return
        for run, job in zip(ready, jobs):
            run.job, run.status = job, "pending"
            run.log = str(_task_jobs(job)[0].paths.stderr)
        self.active += ready
        ids = ", ".join(str(j.job_id) for j in jobs)
        self.status.say(f"submitted {len(ready)} run(s) to {self.profile['executor']} as job(s) {ids}")

    def _poll(self) -> None:
        if not self.active:
            return
        if self.profile["executor"] == "slurm":
            self.active[0].job.watcher.update()  # one squeue/sacct call for all jobs
        for run in list(self.active):
            if self.profile["executor"] == "debug":
                self._run_here(run)
                continue
            if not (_slurm_finished(run.job) if self.profile["executor"] == "slurm" else run.job.done()):
                run.status = "running" if _state(run.job) in ("RUNNING", "COMPLETING") else "pending"
                continue
            self.active.remove(run)
            _collect(run)
            self._announce(run)

    def _run_here(self, run: Run) -> None:
        """The debug executor runs the job in this process (pdb post-mortem on a terminal when it raises)."""
        self.active.remove(run)
        try:
            run.metrics, run.ranks_agree, run.status = run.job.result(), True, "done"
        except Exception as err:  # noqa: BLE001 - any error of the run is its failure, reported like a job's
            lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
            run.status, run.reason = "failed", f"{type(err).__name__}: {lines[-1] if lines else ''}"
        self._announce(run)

    def _announce(self, run: Run) -> None:
        if run.status == "failed":
            self.status.say(f"FAILED {run.name}: {run.reason} (log: {run.log})")
        else:
            top1 = (run.metrics or {}).get("test_top1") if isinstance(run.metrics, dict) else None
            self.status.say(f"done {run.name}" + ("" if top1 is None else f" (test top-1 {top1:.2f})"))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            (self.log_dir / "%j").rmdir()  # submitit makes its folder pattern literally; each job has its own

    def cancel(self) -> None:
        for run in self.active:
            with contextlib.suppress(Exception):
                run.job.cancel(check=False)
            run.status, run.reason = "cancelled", "the launcher was interrupted"
        for run in self.runs:
            if run.status == "waiting":
                run.status, run.reason = "cancelled", "the launcher was interrupted"
        self.active = []


# ----------------------------------------------------------------------------------------------- launch
def launch(grid_cells: list[dict[str, Any]], profile: str | Path | dict[str, Any] = "local",
           runs_root: str | Path = "runs", *, poll_s: float | None = None, log_dir: str | Path | None = None,
           dry_run: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train every grid cell that has not finished yet and wait for all of them; returns the summary (also
    written to `<runs_root>/launch-summary.json`). Raises BitbenchError before submitting anything if a cell is bad."""
    profile = load_profile(profile)
    runs_root = Path(runs_root).resolve()
    runs = plan(grid_cells, profile, runs_root)
    check_cluster(profile)
    started = time.time()
    status = _Status(runs, quiet=quiet)
    cached = sum(r.status == "cached" for r in runs)
    status.say(f"{len(runs)} run(s), {cached} already finished (cached), profile {profile['name']!r} "
               f"({profile['executor']}, {world_size(profile)} process(es) per run)")
    if dry_run:
        for run in runs:
            if run.status == "waiting":
                run.status = "planned"
                run.reason = f"after {', '.join(d.name for d in run.needs)}" if run.needs else None
        status.close()
        return _summary(runs, profile, runs_root, started, None, write=False)
    log_dir = Path(log_dir) if log_dir else runs_root / "logs" / time.strftime(f"%Y%m%d-%H%M%S-{os.getpid()}")
    poll_s = poll_s if poll_s is not None else (5.0 if profile["executor"] == "slurm" else 1.0)
    scheduler = _Scheduler(runs, profile, log_dir, status, poll_s)
    try:
        while scheduler.step():
            time.sleep(poll_s)
    except BaseException:
        scheduler.cancel()
        status.close()
        _summary(runs, profile, runs_root, started, log_dir)
        raise
    finally:
        scheduler.close()
    status.close()
    return _summary(runs, profile, runs_root, started, log_dir)


def _summary(runs: list[Run], profile: dict[str, Any], runs_root: Path, started: float, log_dir: Path | None,
             write: bool = True) -> dict[str, Any]:
    from benchmark.checkpoint import atomic_write_json

    summary = {
        "profile": profile, "runs_root": str(runs_root), "log_dir": None if log_dir is None else str(log_dir),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "counts": {s: sum(r.status == s for r in runs) for s in _Status.ORDER if any(r.status == s for r in runs)},
        "ok": all(r.status in ("done", "cached") for r in runs),
        "runs": [r.record() for r in runs],
    }
    if write:
        atomic_write_json(runs_root / SUMMARY, summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table: run, status, test top-1, job, and the log or reason of a failure."""
    rows = [("run", "status", "test top-1", "job", "note")]
    for r in summary["runs"]:
        top1 = (r["metrics"] or {}).get("test_top1")
        note = r["reason"] or ""
        if r["status"] == "failed" and r["log"]:
            note = f"{note} (log: {r['log']})"
        rows.append((r["name"], r["status"], "" if top1 is None else f"{top1:.2f}", r["job_id"] or "", note))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4] for row in rows).rstrip()


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", help="YAML with `grid:` (datasets, archs, methods, seeds), data_root, runs_root, "
                                    "launcher: {profile: ...} and per-dataset `overrides:` (e.g. params.yaml)")
    p.add_argument("--datasets", nargs="+", help="datasets (default: from --params)")
    p.add_argument("--archs", nargs="+", help="architectures (default: from --params, else resnet20)")
    p.add_argument("--methods", nargs="+", help="`method` or `method:variant` entries (default: from --params)")
    p.add_argument("--seeds", nargs="+", type=int, help="seeds (default: from --params, else 0)")
    p.add_argument("--profile", help="profile name under slurm/profiles/ or a YAML path (default: local)")
    p.add_argument("--runs-root", help="where run directories go (default: from --params, else runs)")
    p.add_argument("--data-root", help="prepared datasets, one folder each (default: from --params, else data)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run, e.g. --set epochs=1 (repeatable)")
    p.add_argument("--poll", type=float, default=None, help="seconds between status checks")
    p.add_argument("--dry-run", action="store_true", help="check the grid and show what would run; submit nothing")


def _split(values: list[str] | None) -> list[str] | None:
    return None if values is None else [v for item in values for v in str(item).split(",") if v]


def run(args: argparse.Namespace) -> int:
    from benchmark.train import parse_overrides

    from benchmark.runs import load_params

    params = load_params(args.params, require_grid=False) if args.params else {}
    grid = params.get("grid", {})

    def pick(cli: Any, key: str, default: Any = None) -> Any:
        return cli if cli is not None else grid.get(key, default)

    datasets, methods = pick(_split(args.datasets), "datasets"), pick(_split(args.methods), "methods")
    if not datasets or not methods:
        raise BitbenchError("no grid: give --params with a `grid:` section or --datasets and --methods")
    cells = grid_cells(
        list(datasets), list(pick(_split(args.archs), "archs", ["resnet20"])), list(methods),
        list(pick(args.seeds, "seeds", [0])), data_root=args.data_root or params.get("data_root", "data"),
        overrides=params.get("overrides") or {}, common_overrides=parse_overrides(args.set),
        method_overrides=params.get("method_overrides") or {})
    profile = args.profile or (params.get("launcher") or {}).get("profile", "local")
    runs_root = args.runs_root or params.get("runs_root", "runs")

    with _sigterm_as_interrupt():
        summary = launch(cells, profile, runs_root, poll_s=args.poll, dry_run=args.dry_run)
    print(format_table(summary))
    if args.dry_run:
        return 0
    print(f"summary: {Path(summary['runs_root']) / SUMMARY}")
    return 0 if summary["ok"] else 1


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A launcher killed with SIGTERM (e.g. by DVC or a CI timeout) cancels its jobs, as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
