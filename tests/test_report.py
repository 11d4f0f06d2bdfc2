"""`bitbench report` on hand-made run directories: every status, seed statistics, outputs, figures, bad input."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from benchmark.cli import main
from benchmark.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"
FULL = 1000  # longer than any paper recipe: the hand-made ImageNet runs count as full schedules


def make_run(root: Path, dataset: str, arch: str, name: str, seed: int, *, top1: float | None, best_top1: float = 0.0,
             epochs: int = 2, overrides: dict | None = None, error: str | None = None,
             curve: tuple[float, ...] = ()) -> Path:
    """A run directory as `benchmark.train` writes it: config.json, metrics.json (or error.txt), dvclive logs."""
    method = name.split("-", 1)[0]
    run_dir = root / dataset / arch / name / f"seed{seed}"
    run_dir.mkdir(parents=True)
    classes, size, channels = (1000, 224, 3) if dataset == "imagenet" else (10, 28, 1)
    config = {"dataset": dataset, "arch": arch, "method": method, "variant": None, "seed": seed,
              "overrides": overrides or {}, "recipe": {"stages": [{"name": "main", "epochs": epochs}]},
              "world_size": 1, "hash": f"h{dataset}{arch}{name}{seed}", "num_classes": classes,
              "image_size": size, "in_channels": channels, "run_dir": str(run_dir)}
    (run_dir / "config.json").write_text(json.dumps(config))
    if error:
        (run_dir / "error.txt").write_text(f"Traceback (most recent call last):\n  File \"x.py\"\n{error}\n")
    if top1 is not None:
        metrics = {"hash": config["hash"], "dataset": dataset, "arch": arch, "method": method, "variant": None,
                   "seed": seed, "test_top1": top1, "test_top5": 99.0, "test_loss": 0.3, "val_top1": top1,
                   "best_val_epoch": 1, "best_val_top1": top1, "test_top1_at_best_val": best_top1,
                   "test_top5_at_best_val": 98.0, "epochs": epochs, "recipe_epochs": epochs, "steps_per_epoch": 10,
                   "wall_seconds": 125.0 + seed, "train_seconds": 100.0, "images_per_second": 500.0,
                   "device": "cpu (2 cores)", "world_size": 1}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if curve:
        tsv = run_dir / "dvclive" / "plots" / "metrics" / "val_top1.tsv"
        tsv.parent.mkdir(parents=True)
        tsv.write_text("step\tval_top1\n" + "".join(f"{i}\t{v}\n" for i, v in enumerate(curve)))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "runs"
    short = {"epochs": 2, "max_batches": 10}
    # the grid (fashion-mnist / resnet20 / fp, xnor, bireal x seeds 0, 1): fp finished twice (short schedule),
    # xnor seed 0 failed (error.txt + launcher entry), xnor seed 1 failed before its directory existed, bireal not run
    make_run(root, "fashion-mnist", "resnet20", "fp", 0, top1=90.0, best_top1=89.0, overrides=short,
             curve=(80.0, 90.0))
    make_run(root, "fashion-mnist", "resnet20", "fp", 1, top1=91.0, best_top1=90.0, overrides=short,
             curve=(82.0, 91.0))
    xnor0 = make_run(root, "fashion-mnist", "resnet20", "xnor", 0, top1=None, error="RuntimeError: boom", curve=(50.0,))
    # reactnet seed 0 is still running (no metrics yet); seed 1 holds metrics of an older config (stale)
    make_run(root, "fashion-mnist", "resnet20", "reactnet", 0, top1=None)
    stale = make_run(root, "fashion-mnist", "resnet20", "reactnet", 1, top1=80.0, overrides=short)
    config = json.loads((stale / "config.json").read_text())
    (stale / "config.json").write_text(json.dumps({**config, "hash": "a-newer-config"}))
    # outside the grid: ImageNet ResNet-18 at full length against published numbers of every kind
    make_run(root, "imagenet", "resnet18", "bireal", 0, top1=56.0, best_top1=55.0, epochs=FULL)
    make_run(root, "imagenet", "resnet18", "bireal", 1, top1=56.6, best_top1=55.2, epochs=FULL)
    make_run(root, "imagenet", "resnet18", "bireal", 2, top1=None, error="ValueError: loss is nan", epochs=FULL)
    make_run(root, "imagenet", "resnet18", "xnor", 0, top1=45.0, best_top1=45.0, epochs=FULL)
    make_run(root, "imagenet", "resnet18", "fp", 0, top1=69.0, best_top1=69.0, epochs=FULL)
    bitat = make_run(root, "imagenet", "resnet18", "bitat", 0, top1=60.0, best_top1=60.0, epochs=FULL)
    # fractional stages: more evaluation rounds (`epochs`) than epochs of data, whose sum rounds off
    metrics = json.loads((bitat / "metrics.json").read_text())
    (bitat / "metrics.json").write_text(json.dumps({**metrics, "epochs": FULL + 5, "recipe_epochs": FULL + 1e-12}))
    make_run(root, "imagenet", "resnet18", "reactnet", 0, top1=66.0, best_top1=66.0, epochs=2,
             overrides={"epochs": 2})
    logs = tmp_path / "logs"
    (root / "launch-summary.json").write_text(json.dumps({"runs_root": str(root), "runs": [
        {"name": "fashion-mnist/resnet20/xnor/seed0", "status": "failed", "run_dir": str(xnor0.resolve()),
         "log": str(logs / "7_0_log.err"), "reason": "RuntimeError: boom"},
        {"name": "fashion-mnist/resnet20/xnor/seed1", "status": "failed",
         "run_dir": str((root / "fashion-mnist/resnet20/xnor/seed1").resolve()),
         "log": str(logs / "7_1_log.err"), "reason": "BitbenchError: no dataset shards"},
        {"name": "fashion-mnist/resnet20/bireal/seed1", "status": "skipped", "log": None,
         "run_dir": str((root / "fashion-mnist/resnet20/bireal/seed1").resolve()),
         "reason": "needs fashion-mnist/resnet20/fp/seed1, which failed"},
    ]}))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"runs_root": str(root), "grid": {
        "datasets": ["fashion-mnist"], "archs": ["resnet20"], "methods": ["fp", "xnor", "bireal", "reactnet"],
        "seeds": [0, 1]}}))
    return root, params


def rows_by_name(board: dict) -> dict[tuple[str, str, str], dict]:
    return {(t["dataset"], t["arch"], e["name"]): e for t in board["tables"] for e in t["rows"]}


def test_every_status_and_the_numbers(runs, tmp_path):
    root, params = runs
    out = tmp_path / "out"
    board = write_report(root, params, out, progress=False)
    rows = rows_by_name(board)
    fp = rows["fashion-mnist", "resnet20", "fp"]
    assert fp["n"] == 2 and fp["in_grid"]
    assert fp["test_top1"]["mean"] == pytest.approx(90.5) and fp["test_top1"]["std"] == pytest.approx(math.sqrt(0.5))
    assert fp["test_top1_at_best_val"]["mean"] == pytest.approx(89.5)
    assert fp["wall_seconds"]["mean"] == pytest.approx(125.5)
    assert fp["schedule"] == "short" and "max_batches=10" in fp["schedule_detail"]
    assert fp["status"] == "no published number" and fp["published"] is None
    assert "fashion-mnist-fp-resnet18-readme" in fp["context_published"]  # the FP ceilings, as context

    xnor = rows["fashion-mnist", "resnet20", "xnor"]
    assert xnor["status"] == "failed" and "RuntimeError: boom" in xnor["status_detail"]
    assert str(root / "fashion-mnist/resnet20/xnor/seed0/error.txt") in xnor["logs"]
    assert str(tmp_path / "logs" / "7_1_log.err") in xnor["logs"]  # failed before its run directory existed
    bireal = rows["fashion-mnist", "resnet20", "bireal"]
    assert bireal["status"] == "not run" and [r["state"] for r in bireal["runs"]] == ["not run", "not run"]
    assert bireal["runs"][1]["reason"] == "skipped: needs fashion-mnist/resnet20/fp/seed1, which failed"
    reactnet = rows["fashion-mnist", "resnet20", "reactnet"]
    assert reactnet["status"] == "incomplete" and reactnet["n"] == 0
    assert "stale" in reactnet["runs"][1]["reason"]

    bireal = rows["imagenet", "resnet18", "bireal"]
    assert not bireal["in_grid"] and bireal["schedule"] == "full"
    assert bireal["published"]["key"] == "imagenet-resnet18-bireal" and bireal["published"]["mark"] == "code"
    assert bireal["test_top1"]["mean"] == pytest.approx(56.3) and bireal["diff"] == pytest.approx(-0.1)
    assert bireal["status"] == "reproduced" and bireal["status_detail"] == "1 of 3 seeds failed"
    assert bireal["runs"][2]["state"] == "failed" and bireal["runs"][2]["reason"] == "ValueError: loss is nan"
    xn = rows["imagenet", "resnet18", "xnor"]
    assert xn["status"] == "below published" and xn["diff"] == pytest.approx(45.0 - 51.2)
    assert rows["imagenet", "resnet18", "fp"]["status"] == "published number unverified"
    bitat = rows["imagenet", "resnet18", "bitat"]
    assert bitat["status"] == "no published number" and bitat["published"]["top1"] is None
    assert bitat["epochs"]["mean"] == FULL and bitat["schedule"] == "full"
    assert fp["epochs"]["mean"] == 2
    assert rows["imagenet", "resnet18", "reactnet"]["status"] == "short schedule (no verdict)"

    assert board["counts"] == {"no published number": 2, "failed": 1, "not run": 1, "incomplete": 1, "reproduced": 1,
                               "below published": 1, "published number unverified": 1,
                               "short schedule (no verdict)": 1}
    assert board["summary"]["fashion-mnist/resnet20/fp/seed1/test_top1"] == 91.0
    assert board["summary"]["imagenet/resnet18/bireal/seed0/test_top1"] == 56.0
    assert len(board["summary"]) == 8
    # the Fashion-MNIST full-precision ceilings appear as context, never as a target
    assert "fashion-mnist-fp-resnet18-readme" in [r["key"] for r in board["context"]["fashion-mnist"]]

    # the files say the same
    saved = json.loads((out / "leaderboard.json").read_text())
    assert saved["summary"] == board["summary"] and saved["counts"] == board["counts"]
    md = (out / "leaderboard.md").read_text()
    for text in ("| fp | short (", "max_batches=10) | 2/2 | 90.50 ± 0.71", "89.50 ± 0.71",
                 "56.4 [code]", "-0.10", "69.76 [unverified]", "no published number on file",
                 "short schedule (no verdict)", "below published", "reproduced", "not run",
                 "tolerance **1 point(s)**", "94.9", "bireal †", "7_1_log.err", "not run: seed 1 skipped: needs",
                 "no published number on file (5 context row(s) below)", "**incomplete**", "reproduced: 1 of 3 seeds failed", "ValueError: loss is nan",
                 f"failed: 2 of 2 seeds failed: RuntimeError: boom (log: `{root}/fashion-mnist/resnet20/xnor"):
        assert text in md, text

    # figures: real PNG files, linked from the markdown
    figures = sorted((out / "figures").iterdir())
    names = [p.name for p in figures]
    assert "fashion-mnist_resnet20_curves.png" in names and "imagenet_resnet18_acc_vs_ops.png" in names
    for path in figures:
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 1000, path
        assert f"figures/{path.name}" in md
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary leftovers


def test_compare_best_val_and_tolerance_change_the_verdict(runs, tmp_path):
    root, params = runs
    board = write_report(root, params, tmp_path / "a", compare="best-val", progress=False)
    bireal = rows_by_name(board)["imagenet", "resnet18", "bireal"]
    assert bireal["diff"] == pytest.approx(55.1 - 56.4) and bireal["status"] == "below published"
    board = write_report(root, None, tmp_path / "b", tolerance=0.05, progress=False)
    rows = rows_by_name(board)
    assert rows["imagenet", "resnet18", "bireal"]["status"] == "below published"
    assert "bireal" not in {name for (_, _, name) in rows if _ == "fashion-mnist"}  # no grid: only existing runs


def test_cli_writes_the_report_and_rejects_bad_input(runs, tmp_path, capsys):
    root, params = runs
    out = tmp_path / "cli"
    assert main(["report", "--runs", str(root), "--params", str(params), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "fashion-mnist/resnet20: fp 90.50 ± 0.71 (n=2) no published number" in stdout
    assert (out / "leaderboard.md").is_file() and (out / "leaderboard.json").is_file()
    # a second run replaces the outputs in place
    assert main(["report", "--runs", str(root), "--params", str(params), "--out", str(out)]) == 0
    capsys.readouterr()

    for argv, message in (
        (["--runs", str(tmp_path / "nowhere")], "runs directory"),
        (["--runs", str(root), "--params", str(tmp_path / "missing.yaml")], "params file"),
        (["--runs", str(root), "--tolerance", "-1"], "tolerance must be a non-negative"),
    ):
        assert main(["report", *argv, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid: {datasets: [fashion-mnist]}\n")
    assert main(["report", "--runs", str(root), "--params", str(bad), "--out", str(tmp_path / "bad")]) == 2
    assert "grid.methods" in capsys.readouterr().err
