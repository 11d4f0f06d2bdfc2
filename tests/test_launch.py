"""`bitbench launch`: profiles, checks before submission, a parallel local grid with a dependency and a cache, and
through the real local SLURM cluster a 2-task DDP run, a requeue that resumes, a failing run, and cancellation."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import submitit
import yaml

from benchmark import cli
from benchmark.errors import BitbenchError
from benchmark.launch import SUMMARY, grid_cells, launch, load_profile, make_executor, plan
from test_slurm_cluster import cluster_state

TINY = {"max_batches": 2, "eval_max_batches": 1, "batch_size": 32, "workers": 0}
COMPARED = ("test_top1", "test_top5", "test_loss", "val_top1", "best_val_epoch", "best_val_top1",
            "test_top1_at_best_val", "epochs", "steps_per_epoch", "world_size")
RUN_FILES = ("config.json", "metrics.json", "environment.json", "checkpoint.pt", "model.pt")
slurm_running = pytest.mark.skipif(cluster_state() is None, reason="the local SLURM cluster is not running: "
                                   "source slurm/local-cluster/env.sh && bash slurm/local-cluster/start.sh")


def bitbench_launch(*args: str, runs_root: Path, wait: bool = True, timeout: float = 300):
    """`bitbench launch ...` as a separate process, the way users and DVC run it."""
    cmd = [sys.executable, "-m", "benchmark", "launch", "--runs-root", str(runs_root), "--poll", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the launcher cancels its jobs on SIGTERM
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"bitbench launch did not finish within {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def summary_of(runs_root: Path) -> dict:
    return json.loads((runs_root / SUMMARY).read_text())


def by_method(summary: dict) -> dict[str, dict]:
    return {r["method"]: r for r in summary["runs"]}


def job_span(stderr_log: str) -> tuple[datetime, datetime]:
    """When submitit started and finished the job's callable, from its log (submitit logs to the task's stdout)."""
    stamps = re.findall(r"submitit INFO \((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)\) - (Starting|Job completed)",
                        Path(stderr_log).with_suffix(".out").read_text())
    start = next(t for t, what in stamps if what == "Starting")
    end = [t for t, what in stamps if what == "Job completed"][-1]
    return tuple(datetime.strptime(t, "%Y-%m-%d %H:%M:%S,%f") for t in (start, end))


def slurm_job_ids() -> set[str]:
    out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i"], capture_output=True, text=True, timeout=30)
    return set(out.stdout.split())


def wait_for(predicate, timeout: float, what: str, step: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def write_params(path: Path, data_root: Path, methods: list[str], profile: str, **overrides) -> Path:
    path.write_text(yaml.safe_dump({
        "grid": {"datasets": ["fashion-mnist"], "archs": ["resnet20"], "methods": methods, "seeds": [0]},
        "data_root": str(data_root), "runs_root": "unused-runs", "launcher": {"profile": profile},
        "overrides": {"fashion-mnist": {**TINY, **overrides}}}))
    return path


# ----------------------------------------------------------------------------------------------- profiles
def test_shipped_profiles_load_and_configure_submitit(tmp_path):
    kinds = {"local": submitit.LocalExecutor, "debug": submitit.DebugExecutor,
             "local-cluster": submitit.SlurmExecutor, "example-multinode": submitit.SlurmExecutor}
    for name, kind in kinds.items():
        assert isinstance(make_executor(load_profile(name), tmp_path), kind), name
    cluster = load_profile("local-cluster")
    assert (cluster["partition"], cluster["tasks_per_node"], cluster["name"]) == ("debug", 2, "local-cluster")
    ex = make_executor(load_profile("example-multinode"), tmp_path)
    sbatch = ex._make_submission_file_text("python -m x", "uid")  # the exact script submitit would sbatch
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--partition=gpu",
                 "--account=my-lab", "--qos=normal", "--time=1440", "--signal=USR2@120", "--mail-type=FAIL",
                 "--constraint='a100|h100'", "--mem=491520M"):
        assert f"#SBATCH {line}" in sbatch, line
    assert "module load cuda/12.4 nccl" in sbatch and "--kill-on-bad-exit=1" in sbatch
    assert ex.max_num_timeout == 20
    # a profile given as a path, with a cap of one run at a time
    path = tmp_path / "mine.yaml"
    path.write_text("executor: local\ntasks_per_node: 2\narray_parallelism: 1\ntimeout_min: 30\n")
    assert load_profile(path)["tasks_per_node"] == 2 and load_profile(str(path))["name"] == "mine"


@pytest.mark.parametrize("profile, message", [
    ({"executor": "kubernetes"}, "executor must be one of local, slurm, debug"),
    ({"timeout_min": 1.5}, "timeout_min must be int"),
    ({"partiton": "gpu"}, "unknown setting(s) partiton"),
    ({"executor": "local", "nodes": 2}, "the local executor runs on one node"),
    ({"setup": "module load cuda"}, "setup must be list"),
    ({"checkpoint_steps": -1}, "checkpoint_steps must be 0 (epoch ends only) or more"),
    ("no-such-profile", "unknown launch profile 'no-such-profile' (known: debug, example-multinode, local, "),
])
def test_bad_profiles_are_rejected(profile, message):
    with pytest.raises(BitbenchError, match=re.escape(message)):
        load_profile(profile)


# ----------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize("problem", ["unknown method", "missing shards", "missing teacher", "unknown override",
                                     "malformed params"])
def test_bad_grid_fails_before_anything_is_submitted(problem, fmnist_dir, tmp_path, capsys):
    profile = "local-cluster" if cluster_state() else "local"
    (tmp_path / "bad.yaml").write_text("grid: [unclosed\n")
    args = {"unknown method": ["--methods", "fp", "nosuch"],
            "missing shards": ["--methods", "fp", "--data-root", str(tmp_path / "empty")],
            "missing teacher": ["--methods", "reactnet"],
            "unknown override": ["--methods", "fp", "--set", "epoch=1"],
            "malformed params": ["--params", str(tmp_path / "bad.yaml")]}[problem]
    expected = {"unknown method": "unknown method 'nosuch'",
                "missing shards": f"no dataset shards at {tmp_path / 'empty' / 'fashion-mnist'}",
                "missing teacher": "reactnet/seed0 needs the finished run",
                "unknown override": "unknown override(s) epoch",
                "malformed params": f"params file {tmp_path / 'bad.yaml'} is not valid YAML"}[problem]
    before = slurm_job_ids() if profile == "local-cluster" else set()
    argv = ["launch", "--profile", profile, "--datasets", "fashion-mnist", "--data-root", str(fmnist_dir.parent),
            "--runs-root", str(tmp_path / "runs"), *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.startswith("bitbench launch: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # no job folder, no summary: nothing was submitted
    if profile == "local-cluster":
        assert slurm_job_ids() == before


def test_dry_run_shows_the_plan_from_params_and_submits_nothing(fmnist_dir, tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", fmnist_dir.parent, ["fp", "reactnet", "bireal:paper"],
                          "example-multinode", epochs=1)
    # the command line wins over params.yaml: another profile, seeds and runs root
    argv = ["launch", "--params", str(params), "--profile", "local", "--seeds", "0", "1",
            "--runs-root", str(tmp_path / "runs"), "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert len(lines) == 1 + 6 and "profile 'local'" in out.err
    assert any(re.match(r"fashion-mnist/resnet20/reactnet/seed1 +planned +after fashion-mnist/resnet20/fp/seed1$", ln)
               for ln in lines), out.out
    assert any(ln.startswith("fashion-mnist/resnet20/bireal-paper/seed0 ") for ln in lines), out.out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
@slurm_running
def test_what_the_cluster_refuses_is_reported_and_nothing_runs(fmnist_dir, tmp_path):
    cells = grid_cells(["fashion-mnist"], ["resnet20"], ["fp"], [0], fmnist_dir.parent, common_overrides=TINY)
    profile = {**load_profile("local-cluster"), "name": "wrong-partition", "partition": "gpu"}
    before = slurm_job_ids()
    with pytest.raises(BitbenchError, match=r"asks for partition 'gpu', which this cluster does not have "
                                            r"\(partitions: debug\)"):
        launch(cells, profile, tmp_path / "runs", quiet=True)
    assert slurm_job_ids() == before and not (tmp_path / "runs").exists()
    # sbatch itself refuses GPUs this cluster does not have (no GRES): the run fails with sbatch's reason
    summary = launch(cells, {**load_profile("local-cluster"), "gpus_per_node": 1}, tmp_path / "runs", quiet=True)
    (run,) = summary["runs"]
    assert not summary["ok"] and run["status"] == "failed" and run["job_id"] is None
    assert run["reason"] == "submission failed: sbatch: error: Invalid generic resource (gres) specification"
    assert slurm_job_ids() == before


def test_world_size_must_match_profile_and_divide_the_batch(fmnist_dir, tmp_path):
    cells = grid_cells(["fashion-mnist"], ["resnet20"], ["fp"], [0], fmnist_dir.parent, common_overrides=TINY)
    cells[0]["overrides"]["world_size"] = 4
    with pytest.raises(BitbenchError, match="world size 4 does not match profile 'local-cluster'"):
        plan(cells, load_profile("local-cluster"), tmp_path)
    odd = grid_cells(["fashion-mnist"], ["resnet20"], ["fp"], [0], fmnist_dir.parent,
                     common_overrides={**TINY, "batch_size": 33})
    with pytest.raises(BitbenchError, match="batch size 33 is not divisible by the world size 2"):
        plan(odd, load_profile("local-cluster"), tmp_path)


def test_profile_checkpoint_steps_reach_the_runs_without_changing_their_hash(fmnist_dir, tmp_path):
    cells = grid_cells(["fashion-mnist"], ["resnet20"], ["fp"], [0], fmnist_dir.parent, common_overrides=TINY)
    (default,) = plan(cells, load_profile("local"), tmp_path)
    (often,) = plan(cells, {**load_profile("local"), "checkpoint_steps": 500}, tmp_path)
    assert default.config["checkpoint_steps"] == 0 and often.config["checkpoint_steps"] == 500
    assert often.config["hash"] == default.config["hash"]
    assert load_profile("example-multinode")["checkpoint_steps"] > 0


# ----------------------------------------------------------------------------------------------- local
def test_local_grid_runs_in_parallel_waits_for_the_teacher_and_caches(fmnist_dir, tmp_path):
    cells = grid_cells(["fashion-mnist"], ["resnet20"], ["fp", "bireal", "reactnet"], [0], fmnist_dir.parent,
                       common_overrides={**TINY, "epochs": 1})
    # what an earlier config of the fp cell left behind is set aside (kept), not resumed from
    old = tmp_path / "runs" / "fashion-mnist" / "resnet20" / "fp" / "seed0"
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"hash": "0123456789abcdef"}))
    (old / "checkpoint.pt").write_bytes(b"an older config's checkpoint")
    summary = launch(cells, "local", tmp_path / "runs", poll_s=0.5, quiet=True)
    assert summary["ok"] and summary["counts"] == {"done": 3}
    assert summary == json.loads((tmp_path / "runs" / SUMMARY).read_text())
    runs = by_method(summary)
    assert runs["reactnet"]["needs"] == ["fashion-mnist/resnet20/fp/seed0"]
    for run in runs.values():
        assert run["ranks_agree"] and run["metrics"]["world_size"] == 1
        for name in RUN_FILES:
            assert (Path(run["run_dir"]) / name).is_file(), (run["name"], name)
    (stale,) = (old.parent / ".stale").iterdir()
    assert stale.name.startswith("seed0-0123456789abcdef-")
    assert (stale / "checkpoint.pt").read_bytes() == b"an older config's checkpoint"
    fp, bireal, reactnet = (job_span(runs[m]["log"]) for m in ("fp", "bireal", "reactnet"))
    assert fp[0] < bireal[1] and bireal[0] < fp[1], "fp and bireal should train at the same time"
    assert reactnet[0] >= fp[1], "reactnet must wait for its fp teacher"

    # a second launch of the same grid trains nothing
    t0 = time.time()
    again = launch(cells, "local", tmp_path / "runs", poll_s=0.5, quiet=True)
    assert again["counts"] == {"cached": 3} and all(r["job_id"] is None for r in again["runs"])
    assert {m: r["metrics"] for m, r in by_method(again).items()} == {m: r["metrics"] for m, r in runs.items()}
    assert time.time() - t0 < 30
    # retraining the teacher / starting point retrains what depends on it, and nothing else
    changed = [dict(c, overrides={**c["overrides"], "eval_max_batches": 2}) if c["method"] == "fp" else c
               for c in cells]
    status = {r.config["method"]: r.status for r in plan(changed, load_profile("local"), tmp_path / "runs")}
    assert status == {"fp": "waiting", "bireal": "cached", "reactnet": "waiting"}
    # one log folder per job, and none for the launch that had nothing to train
    job_dirs = sorted(p for p in (tmp_path / "runs" / "logs").glob("*/*"))
    assert job_dirs == sorted(Path(r["log"]).parent for r in runs.values())


def test_debug_profile_trains_in_this_process(fmnist_dir, tmp_path):
    cells = grid_cells(["fashion-mnist"], ["resnet20"], ["fp"], [0], fmnist_dir.parent,
                       common_overrides={**TINY, "epochs": 1})
    summary = launch(cells, "debug", tmp_path / "runs", poll_s=0.1, quiet=True)
    (run,) = summary["runs"]
    assert summary["ok"] and run["status"] == "done" and run["job_id"].startswith("DEBUG_")
    environment = json.loads((Path(run["run_dir"]) / "environment.json").read_text())
    assert environment["world_size"] == 1 and run["metrics"]["test_samples"] == 256


# ----------------------------------------------------------------------------------------------- SLURM
def _job_dir(runs_root: Path) -> Path | None:
    dirs = [d for d in (runs_root / "logs").glob("*/*") if d.is_dir()]
    return dirs[0] if dirs else None


def _squeue_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def slurm_pair(fmnist_dir, tmp_path_factory):
    """The same 2-task run launched twice at once on the cluster: once untouched, once signalled (USR2, as
    SLURM does before a time limit) after its first epoch's checkpoint and requeued."""
    root = tmp_path_factory.mktemp("slurm-pair")
    params = write_params(root / "params.yaml", fmnist_dir.parent, ["fp"], "local-cluster", epochs=4)
    reference = bitbench_launch("--params", str(params), runs_root=root / "reference", wait=False)
    interrupted = bitbench_launch("--params", str(params), runs_root=root / "interrupted", wait=False)
    try:
        ckpt = root / "interrupted" / "fashion-mnist" / "resnet20" / "fp" / "seed0" / "checkpoint.pt"
        wait_for(ckpt.is_file, 240, "the first checkpoint of the interrupted run", step=0.05)
        job_id = _job_dir(root / "interrupted").name
        # what submitit's job._interrupt(timeout=True) does: USR2 to the tasks; rank 0 checkpoints and requeues
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        wait_for(lambda: _squeue_state(job_id) in ("PENDING", "REQUEUED"), 60, "the requeue")
        # a requeued job waits ~2 min (BeginTime); let it start now
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
        results = {}
        for name, proc in (("reference", reference), ("interrupted", interrupted)):
            out, err = proc.communicate(timeout=300)
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        yield root, results, job_id
    finally:
        for proc in (reference, interrupted):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)


@pytest.mark.slurm
@slurm_running
def test_two_task_ddp_run_on_slurm_is_complete_and_ranks_agree(slurm_pair):
    root, results, _ = slurm_pair
    done = results["reference"]
    assert done.returncode == 0, done.stderr[-3000:]
    run = summary_of(root / "reference")["runs"][0]
    assert run["status"] == "done" and run["ranks_agree"] is True
    run_dir = Path(run["run_dir"])
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "dvclive").is_dir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 4 and metrics == run["metrics"]
    assert json.loads((run_dir / "environment.json").read_text())["slurm_job_id"]
    # both tasks returned the same metrics (timings aside)
    job_dir = Path(run["log"]).parent
    per_task = [submitit.core.utils.pickle_load(job_dir / f"{job_dir.name}_{t}_result.pkl") for t in (0, 1)]
    assert [outcome for outcome, _ in per_task] == ["success", "success"]
    assert {k: per_task[0][1][k] for k in COMPARED} == {k: per_task[1][1][k] for k in COMPARED}
    assert "fashion-mnist/resnet20/fp/seed0  done" in done.stdout

    # launching again submits nothing: the run is finished with the same config hash
    before = slurm_job_ids()
    params = root / "params.yaml"
    again = bitbench_launch("--params", str(params), runs_root=root / "reference", timeout=120)
    assert again.returncode == 0 and "1 already finished (cached)" in again.stderr
    assert summary_of(root / "reference")["counts"] == {"cached": 1} and slurm_job_ids() == before


@pytest.mark.slurm
@slurm_running
def test_requeued_run_resumes_from_its_checkpoint_with_the_same_metrics(slurm_pair):
    root, results, job_id = slurm_pair
    done = results["interrupted"]
    assert done.returncode == 0, done.stderr[-3000:]
    run = summary_of(root / "interrupted")["runs"][0]
    log = Path(run["log"]).read_text()
    assert re.search(r"resumed \S+/fp/seed0 at epoch [123]", log), log[-3000:]
    starts = Path(run["log"]).with_suffix(".out").read_text().count("Starting with JobEnvironment")
    assert starts == 2  # the first attempt and the requeued one
    reference = summary_of(root / "reference")["runs"][0]["metrics"]
    assert {k: run["metrics"][k] for k in COMPARED} == {k: reference[k] for k in COMPARED}


@pytest.mark.slurm
@slurm_running
def test_failed_run_is_reported_with_its_log_and_the_others_finish(fmnist_dir, tmp_path):
    runs_root = tmp_path / "runs"
    params = write_params(tmp_path / "params.yaml", fmnist_dir.parent, ["fp", "bireal", "reactnet"],
                          "local-cluster", epochs=1)
    # make the fp run fail at run time: a damaged checkpoint of exactly its config, which it tries to resume
    cells = grid_cells(["fashion-mnist"], ["resnet20"], ["fp"], [0], fmnist_dir.parent,
                       overrides={"fashion-mnist": {**TINY, "epochs": 1}})
    fp_cfg = plan(cells, load_profile("local-cluster"), runs_root)[0].config
    fp_dir = Path(fp_cfg["run_dir"])
    fp_dir.mkdir(parents=True)
    (fp_dir / "config.json").write_text(json.dumps(fp_cfg))
    (fp_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")

    done = bitbench_launch("--params", str(params), runs_root=runs_root, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    runs = by_method(summary_of(runs_root))
    assert runs["fp"]["status"] == "failed" and runs["bireal"]["status"] == "done"
    assert runs["reactnet"]["status"] == "skipped" and runs["reactnet"]["job_id"] is None
    assert runs["reactnet"]["reason"] == "needs fashion-mnist/resnet20/fp/seed0, which failed"
    log = Path(runs["fp"]["log"])
    assert log.is_file() and "Traceback" in log.read_text() and runs["fp"]["reason"]
    assert f"FAILED fashion-mnist/resnet20/fp/seed0: {runs['fp']['reason']} (log: {log})" in done.stderr
    assert str(log) in done.stdout and (fp_dir / "error.txt").is_file()
    assert json.loads((Path(runs["bireal"]["run_dir"]) / "metrics.json").read_text())["world_size"] == 2


@pytest.mark.slurm
@slurm_running
def test_sigterm_cancels_the_submitted_jobs(fmnist_dir, tmp_path):
    params = write_params(tmp_path / "params.yaml", fmnist_dir.parent, ["fp", "bireal"], "local-cluster", epochs=50)
    proc = bitbench_launch("--params", str(params), runs_root=tmp_path / "runs", wait=False)
    try:
        job_dir = wait_for(lambda: _job_dir(tmp_path / "runs"), 120, "the submission")
        array = job_dir.name.split("_")[0]
        wait_for(lambda: "RUNNING" in _squeue_state(array), 120, "the jobs to start")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    states = wait_for(lambda: (s := _squeue_state(array).split()) and all(x == "CANCELLED" for x in s) and s,
                      60, "the jobs to be cancelled")
    assert len(states) == 2
    summary = summary_of(tmp_path / "runs")
    assert summary["counts"] == {"cancelled": 2} and not summary["ok"]

