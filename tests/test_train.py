"""The training engine: DDP gradients, determinism, resume after a kill, recipe stages, bad configs."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import submitit
import torch

from baselines.recipe import Optim, Stage
from benchmark.distributed import gradient_probe
from benchmark.optim import lr_factor
from benchmark.runs import resolve_config
from benchmark.train import _stage_plan, train

TINY = {"max_batches": 3, "eval_max_batches": 2, "batch_size": 32, "workers": 0}
COMPARED = ("test_top1", "test_loss", "val_top1", "best_val_epoch", "best_val_top1", "test_top1_at_best_val",
            "epochs", "steps_per_epoch")


def cell(fmnist_dir, run_dir, method="fp", epochs=2, **over):
    return {"dataset": "fashion-mnist", "data_dir": str(fmnist_dir), "arch": "resnet20", "method": method,
            "seed": 0, "run_dir": str(run_dir), "overrides": {**TINY, "epochs": epochs, **over}}


def test_lr_schedules_and_stage_plan():
    stage = Stage("s", epochs=2, optim=Optim(lr=1.0), schedule="linear")
    assert lr_factor(stage, 0, 10, 5) == 1.0 and lr_factor(stage, 5, 10, 5) == 0.5
    cos = Stage("c", epochs=1, schedule="cosine", warmup_epochs=0.2)
    assert lr_factor(cos, 0, 10, 10) == 0.5  # warm-up: (0+1)/2
    assert abs(lr_factor(cos, 2, 10, 10) - 1.0) < 1e-9
    step = Stage("t", epochs=3, schedule="step", milestones=(1, 2))
    assert [round(lr_factor(step, s, 30, 10), 6) for s in (0, 10, 20)] == [1.0, 0.1, 0.01]
    # fractional stages round to whole steps, at least one; epochs are counted per stage
    assert _stage_plan((Stage("a", 0.5), Stage("b", 2.0), Stage("c", 0.001)), 10) == [(5, 1), (20, 2), (1, 1)]


def test_ddp_gradients_equal_single_process(tmp_path):
    torch.manual_seed(1)
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    single = gradient_probe("reactnet", "resnet20", images, labels)
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="local")
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=10)
    with submitit.helpers.clean_env():
        job = executor.submit(gradient_probe, "reactnet", "resnet20", images, labels)
    per_rank = job.results()
    assert len(per_rank) == 2
    for grads in per_rank:
        assert grads.keys() == single.keys()
        for name, g in single.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_deterministic_on_cpu_and_complete_run_dir(fmnist_dir, tmp_path):
    a = train(resolve_config(cell(fmnist_dir, tmp_path / "a" / "fashion-mnist" / "resnet20" / "fp" / "seed0")))
    b = train(resolve_config(cell(fmnist_dir, tmp_path / "b" / "fashion-mnist" / "resnet20" / "fp" / "seed0")))
    assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}
    run = tmp_path / "a" / "fashion-mnist" / "resnet20" / "fp" / "seed0"
    for name in ("config.json", "metrics.json", "environment.json", "checkpoint.pt", "model.pt"):
        assert (run / name).is_file(), name
    assert (run / "dvclive" / "plots" / "metrics" / "val_top1.tsv").is_file()
    env = json.loads((run / "environment.json").read_text())
    assert env["packages"]["torch"].startswith("2.14.1") and env["world_size"] == 1
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and 0.0 <= metrics["test_top1"] <= 100.0
    # a finished run with the same config is not retrained
    before = (run / "metrics.json").stat().st_mtime_ns
    train(resolve_config(cell(fmnist_dir, run)))
    assert (run / "metrics.json").stat().st_mtime_ns == before


def test_two_step_recipe_and_teacher(fmnist_dir, tmp_path):
    root = tmp_path / "runs" / "fashion-mnist" / "resnet20"
    train(resolve_config(cell(fmnist_dir, root / "fp" / "seed0", epochs=1)))
    metrics = train(resolve_config(cell(fmnist_dir, root / "reactnet" / "seed0", method="reactnet", epochs=2)))
    history = json.loads((root / "reactnet" / "seed0" / "metrics.json").read_text())
    assert history["epochs"] >= 2 and metrics["best_val_epoch"] == metrics["epochs"]  # best chosen in the final stage


def test_resume_after_kill_gives_same_metrics(fmnist_dir, tmp_path):
    straight = train(resolve_config(cell(fmnist_dir, tmp_path / "straight" / "d" / "a" / "fp" / "seed0", epochs=4)))
    run_dir = tmp_path / "killed" / "d" / "a" / "fp" / "seed0"
    cmd = [sys.executable, "-m", "benchmark", "train", "--data-dir", str(fmnist_dir), "--run-dir", str(run_dir),
           "--arch", "resnet20", "--method", "fp", "--set", "epochs=4"] + [f"--set={k}={v}" for k, v in TINY.items()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be interrupted"
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    again = json.loads((run_dir / "metrics.json").read_text())
    assert {k: again[k] for k in COMPARED} == {k: straight[k] for k in COMPARED}


def test_mid_epoch_checkpoint_resumes_at_its_step_with_the_same_metrics(fmnist_dir, tmp_path):
    over = {**TINY, "max_batches": 10}
    straight = train(resolve_config(cell(fmnist_dir, tmp_path / "straight" / "d" / "a" / "fp" / "seed0", epochs=2,
                                         **over)))
    run_dir = tmp_path / "killed" / "d" / "a" / "fp" / "seed0"
    cmd = [sys.executable, "-m", "benchmark", "train", "--data-dir", str(fmnist_dir), "--run-dir", str(run_dir),
           "--arch", "resnet20", "--method", "fp", "--set", "epochs=2", "--checkpoint-steps", "2"] + \
          [f"--set={k}={v}" for k, v in over.items()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run_dir / "checkpoint.pt").exists():  # the first one: after step 2 of epoch 1
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr and "at epoch 0, step " in resumed.stderr, resumed.stderr[-2000:]
    again = json.loads((run_dir / "metrics.json").read_text())
    assert {k: again[k] for k in COMPARED} == {k: straight[k] for k in COMPARED}
    assert again["hash"] == straight["hash"], "when to checkpoint is not part of the config"


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method"),
    (["--arch", "vgg"], "unknown architecture"),
    (["--data-dir", "/nonexistent"], "no dataset shards"),
    (["--method", "reactnet"], "needs the finished 'fp' run"),
    (["--set", "bogus=1"], "unknown override"),
])
def test_bad_config_fails_with_one_line(fmnist_dir, tmp_path, args, message):
    base = ["--data-dir", str(fmnist_dir), "--runs-root", str(tmp_path / "runs")]
    proc = subprocess.run([sys.executable, "-m", "benchmark", "train", *base, *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()
