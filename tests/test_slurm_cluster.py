"""The single-machine SLURM cluster of slurm/local-cluster/: batch jobs, arrays, multi-task steps, the sacct shim,
an idempotent start and fake GPUs. Needs the cluster running (scripts/test.sh starts it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local-cluster"


def cluster_state() -> str | None:
    """The node's state as sinfo reports it, or None when no cluster answers."""
    if not shutil.which("sinfo") or not os.environ.get("SLURM_CONF"):
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(cluster_state() is None, reason="the local SLURM cluster is not running: "
                       "source slurm/local-cluster/env.sh && bash slurm/local-cluster/start.sh"),
]


def sh(*cmd: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)


def sbatch_wait(tmp_path: Path, *args: str, timeout: float = 60) -> str:
    """Submit, wait until every task of the job has ended (squeue keeps finished jobs), return the job id."""
    out = sh("sbatch", "--parsable", "--time=2", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = sh("squeue", "-h", "--states=all", "-j", job, "-o", "%T").stdout.split()
        if states and not set(states) & {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"}:
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job} did not end within {timeout} s")


def test_batch_job_runs_and_sacct_shim_reports_it(tmp_path):
    job = sbatch_wait(tmp_path, "-o", str(tmp_path / "%j.out"), "--wrap", "echo job $SLURM_JOB_ID on $SLURMD_NODENAME")
    assert (tmp_path / f"{job}.out").read_text().strip() == f"job {job} on localhost"
    # exactly submitit's state query (accounting storage is off; the shim answers from squeue)
    out = sh("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", job)
    assert out.returncode == 0 and out.stdout.splitlines() == ["JobID|State|NodeList", f"{job}|COMPLETED|localhost"]
    unknown = sh("sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", "999999")
    assert unknown.returncode == 0 and unknown.stdout.splitlines() == ["JobID|State|NodeList"]


def test_job_array_runs_every_task_with_a_parallelism_cap(tmp_path):
    job = sbatch_wait(tmp_path, "--array=0-3%2", "-o", str(tmp_path / "%A_%a.out"), "--wrap",
                      "echo task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_TASK_COUNT $(date +%s.%N); sleep 1; date +%s.%N")
    outputs = sorted(p.read_text().split() for p in tmp_path.glob(f"{job}_*.out"))
    assert [o[:4] for o in outputs] == [["task", str(i), "of", "4"] for i in range(4)]
    lines = sh("sacct", "--parsable2", "-j", job).stdout.splitlines()[1:]
    assert sorted(lines) == [f"{job}_{i}|COMPLETED|localhost" for i in range(4)]
    # %2: never more than two tasks at once
    spans = [(float(o[4]), float(o[5])) for o in outputs]
    assert max(sum(a <= t < b for a, b in spans) for t, _ in spans) <= 2


def test_srun_starts_two_tasks_and_two_jobs_share_the_node(tmp_path):
    out = sh("srun", "--time=2", "-N1", "-n2", "bash", "-c", "echo $SLURM_PROCID/$SLURM_NTASKS", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split()) == ["0/2", "1/2"]
    # the node claims 4 CPUs: two 2-task jobs run at the same time
    marks = [tmp_path / f"m{i}" for i in range(2)]
    ids = []
    for mark, other in (marks, marks[::-1]):
        script = f"touch {mark}; for i in $(seq 100); do [ -e {other} ] && exit 0; sleep 0.2; done; exit 1"
        got = sh("sbatch", "--parsable", "--time=2", "-n2", "-o", "/dev/null", "--wrap", script, cwd=tmp_path)
        assert got.returncode == 0, got.stderr
        ids.append(got.stdout.strip())
    sh("bash", "-c", f"while squeue -h -j {','.join(ids)} -t PD,R,CG -o %i | grep -q .; do sleep 0.5; done",
       timeout=60)
    states = sh("sacct", "--parsable2", "-j", ids[0], "-j", ids[1]).stdout.splitlines()[1:]
    assert sorted(s.split("|")[1] for s in states) == ["COMPLETED", "COMPLETED"], states


def test_start_is_idempotent():
    pid_file = Path(os.environ["SLURM_DIR"]) / "run" / "slurmctld.pid"
    before = pid_file.read_text()
    out = sh("bash", str(CLUSTER / "start.sh"), timeout=60)
    assert out.returncode == 0, out.stderr
    assert "up" in out.stdout and pid_file.read_text() == before  # nothing restarted
    assert cluster_state() == "idle" or cluster_state() in ("mix", "alloc")


@pytest.mark.skipif(os.geteuid() != 0, reason="fake GPU devices need root (mknod)")
def test_fake_gpus_are_schedulable(tmp_path):
    """BITBENCH_FAKE_GPUS=2 restarts the cluster with two GRES GPUs; jobs asking for GPUs get them."""
    env = {**os.environ, "BITBENCH_FAKE_GPUS": "2"}
    try:
        out = sh("bash", str(CLUSTER / "start.sh"), env=env, timeout=90)
        assert out.returncode == 0, out.stderr + out.stdout
        assert "gpu:2" in sh("sinfo", "-h", "-o", "%G").stdout
        got = sh("srun", "--time=2", "-n2", "--gpus-per-task=1", "bash", "-c",
                 "echo $SLURM_PROCID:$CUDA_VISIBLE_DEVICES", cwd=tmp_path)
        assert got.returncode == 0, got.stderr
        assert sorted(got.stdout.split()) == ["0:0", "1:1"]
    finally:
        back = sh("bash", str(CLUSTER / "start.sh"), timeout=90)  # the usual configuration again
        assert back.returncode == 0, back.stderr
    assert "gpu" not in sh("sinfo", "-h", "-o", "%G").stdout
