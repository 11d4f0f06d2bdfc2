"""One training run (`bitbench train`): a recipe's stages over the shard reader, with DDP, checkpoints and resume.

The engine knows nothing method-specific: it runs `Recipe.stages` in order (each with its optimizer, schedule,
loss and hooks), evaluates on `val` after every epoch, selects the best-on-val epoch among those of the final
stage (the model's final form), and reports test accuracy of the final and of the best-on-val weights.
Checkpoints are written atomically at every epoch end; a restarted run resumes from the last one and, on the
CPU, ends with the same metrics as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any

import submitit
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from baselines.losses import distribution_loss
from baselines.recipe import Stage
from benchmark import distributed
from benchmark.checkpoint import atomic_torch_save, atomic_write_json, build_model, load_run_model
from benchmark.errors import BitbenchError
from benchmark.heap import keep_freed_memory
from benchmark.optim import build_optimizer, lr_factor, set_lr
from benchmark.runs import is_finished, resolve_config, resolve_recipe, run_dir_for

CHECKPOINT, MODEL, METRICS = "checkpoint.pt", "model.pt", "metrics.json"


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, info: distributed.DistInfo, amp: bool) -> dict[str, float]:
    """Top-1, top-5 and loss over every sample of the split, summed across ranks."""
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    for images, labels in loader:
        images, labels = images.to(info.device, non_blocking=True), labels.to(info.device, non_blocking=True)
        with _autocast(info, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        count += labels.numel()
    loss_sum, correct1, correct5, count = distributed.all_sum([loss_sum, correct1, correct5, count], info)
    if count == 0:
        raise BitbenchError("evaluation split is empty")
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss_sum / count,
            "samples": int(count)}


def _autocast(info: distributed.DistInfo, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if amp and info.device.type == "cuda" else nullcontext()


# ----------------------------------------------------------------------------------------------- training
def stage_loss(stage: Stage, logits: torch.Tensor, labels: torch.Tensor,
               teacher_logits: torch.Tensor | None) -> torch.Tensor:
    """The stage's loss: cross-entropy, ReActNet's distributional loss against the teacher, or both."""
    logits = logits.float()
    if stage.loss == "ce":
        return F.cross_entropy(logits, labels, label_smoothing=stage.label_smoothing)
    if teacher_logits is None:
        raise BitbenchError(f"stage {stage.name!r} uses loss {stage.loss!r} but the run has no teacher")
    kd = distribution_loss(logits, teacher_logits.float())
    if stage.loss == "kd":
        return kd
    if stage.loss == "ce+kd":
        return F.cross_entropy(logits, labels, label_smoothing=stage.label_smoothing) + stage.kd_weight * kd
    raise BitbenchError(f"unknown loss {stage.loss!r} (valid: ce, kd, ce+kd)")


def _stage_plan(stages: tuple[Stage, ...], steps_per_epoch: int) -> list[tuple[int, int]]:
    """(steps, epochs) per stage; fractional stage lengths round to whole steps, at least one."""
    plan = []
    for stage in stages:
        steps = max(1, round(stage.epochs * steps_per_epoch))
        plan.append((steps, math.ceil(steps / steps_per_epoch)))
    return plan


def _environment(cfg: dict, info: distributed.DistInfo) -> dict[str, Any]:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "git_commit": commit,
        "packages": {p: version(p) for p in ("torch", "torchvision", "numpy", "webdataset", "submitit", "dvc",
                                            "dvclive", "bitbench")},
        "python": sys.version.split()[0], "platform": platform.platform(), "hostname": platform.node(),
        "dataset_manifest_sha256": cfg["data_hash"], "seed": cfg["seed"], "world_size": info.world_size,
        "device": _device_name(info), "torch_threads": torch.get_num_threads(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def _device_name(info: distributed.DistInfo) -> str:
    if info.device.type == "cuda":
        return torch.cuda.get_device_name(info.device)
    return f"cpu ({os.cpu_count()} cores)"


class _Live:
    """Per-epoch logs through dvclive (so `dvc metrics` / `dvc plots` read them), rebuilt from the history on resume."""

    def __init__(self, run_dir: Path, history: list[dict]):
        from dvclive import Live

        self.live = Live(dir=str(run_dir / "dvclive"), save_dvc_exp=False, dvcyaml=None, report=None)
        for row in history:
            self.log(row)

    def log(self, row: dict) -> None:
        for key in ("train_loss", "train_top1", "val_top1", "val_top5", "val_loss", "lr"):
            self.live.log_metric(key, row[key])
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run (or finish, or just read back) the training run a resolved config describes; returns its metrics."""
    info = distributed.setup()
    try:
        if info.world_size != cfg["world_size"]:
            raise BitbenchError(f"run {cfg['run_dir']} is configured for world size {cfg['world_size']} "
                                f"but started with {info.world_size} processes")
        return _train(cfg, info)
    except BaseException:
        if info.is_main and Path(cfg["run_dir"]).is_dir():
            (Path(cfg["run_dir"]) / "error.txt").write_text(traceback.format_exc())
        raise
    finally:
        distributed.teardown()


def _train(cfg: dict[str, Any], info: distributed.DistInfo) -> dict[str, Any]:
    from benchmark.data import ShardLoader

    run_dir = Path(cfg["run_dir"])
    if is_finished(run_dir, cfg["hash"]):
        return json.loads((run_dir / METRICS).read_text())
    if info.device.type == "cpu":  # BITBENCH_THREADS: set by the launcher when several runs share the machine
        keep_freed_memory()
        share = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, int(os.environ.get("BITBENCH_THREADS", 0)) or share))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").unlink(missing_ok=True)
        atomic_write_json(run_dir / "config.json", cfg)
        atomic_write_json(run_dir / "environment.json", _environment(cfg, info))
    distributed.barrier(info)

    overrides = cfg["overrides"]
    amp = bool(overrides.get("amp", True))
    recipe = resolve_recipe(cfg["method"], cfg["variant"], cfg["dataset"], overrides)
    if recipe.batch_size % info.world_size:
        raise BitbenchError(f"batch size {recipe.batch_size} is not divisible by world size {info.world_size}")
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).to(info.device)
    if cfg.get("init_run"):
        start, _ = load_run_model(cfg["init_run"])
        missing = model.load_state_dict(start.state_dict(), strict=False)
        if info.is_main and (missing.missing_keys or missing.unexpected_keys):
            print(f"init from {cfg['init_run']}: {len(missing.missing_keys)} new, "
                  f"{len(missing.unexpected_keys)} unused tensors", file=sys.stderr)
    teacher = None
    if cfg.get("teacher_run"):
        teacher, _ = load_run_model(cfg["teacher_run"])
    elif recipe.teacher and recipe.teacher.startswith("torchvision:"):
        import torchvision

        teacher = torchvision.models.get_model(recipe.teacher.split(":", 1)[1], weights="DEFAULT")
    if teacher is not None:
        teacher = teacher.to(info.device).eval().requires_grad_(False)

    workers = int(overrides.get("workers", 2))
    loader_args = dict(seed=cfg["seed"], rank=info.rank, world_size=info.world_size, num_workers=workers,
                       image_size=cfg["image_size"])
    train_loader = ShardLoader(cfg["data_dir"], "train", recipe.batch_size // info.world_size, train=True,
                               max_batches=overrides.get("max_batches"), **loader_args)
    eval_args = dict(train=False, max_batches=overrides.get("eval_max_batches"), **loader_args)
    val_loader = ShardLoader(cfg["data_dir"], "val", 256, **eval_args)
    test_loader = ShardLoader(cfg["data_dir"], "test", 256, **eval_args)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise BitbenchError(f"train split of {cfg['data_dir']} has fewer samples than one global batch "
                            f"({recipe.batch_size})")
    plan = _stage_plan(recipe.stages, steps_per_epoch)

    state = {"stage": 0, "stage_epoch": 0, "epoch": 0, "history": [], "best": None,
             "train_seconds": 0.0, "images": 0, "wall_seconds": 0.0}
    best_state = optimizer_state = None
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=info.device, weights_only=False)
        if ckpt["hash"] != cfg["hash"]:
            raise BitbenchError(f"{ckpt_path} belongs to another config (hash {ckpt['hash']} != {cfg['hash']}): "
                                f"remove it or use another run directory")
        state, best_state, optimizer_state = ckpt["state"], ckpt["best_state"], ckpt["optimizer"]
        partial = state.get("partial")  # a mid-epoch checkpoint: the epoch's stage has started too
        for stage in recipe.stages[: state["stage"] + (1 if state["stage_epoch"] or partial else 0)]:
            if stage.apply is not None:
                stage.apply(model)
        model.load_state_dict(ckpt["model"])
        if partial:
            torch.set_rng_state(ckpt["rng"])
        if info.is_main:
            at = f", step {partial['steps']}" if partial else ""
            print(f"resumed {run_dir} at epoch {state['epoch']}{at} (stage {state['stage']})", file=sys.stderr)

    every = int(cfg.get("checkpoint_steps") or 0)  # also save every `every` steps within an epoch (0: epoch ends)

    def save_checkpoint(run_state: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
        atomic_torch_save(ckpt_path, {"hash": cfg["hash"], "model": model.state_dict(), "rng": torch.get_rng_state(),
                                      "optimizer": optimizer.state_dict(), "state": run_state,
                                      "best_state": best_state})

    live = _Live(run_dir, state["history"]) if info.is_main else None
    started = time.time() - state["wall_seconds"]
    last = len(recipe.stages) - 1
    for si in range(state["stage"], len(recipe.stages)):
        stage, (stage_steps, stage_epochs) = recipe.stages[si], plan[si]
        fresh = state["stage_epoch"] == 0 and not state.get("partial")
        if fresh:
            if stage.apply is not None:
                stage.apply(model)
            if stage.calibrate is not None:
                train_loader.set_epoch(state["epoch"])
                stage.calibrate(model, _on_device(train_loader, info, stage.calibrate_batches or steps_per_epoch))
        optimizer = build_optimizer(model, stage.optim)
        if not fresh and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)
        net = nn.parallel.DistributedDataParallel(model) if info.enabled else model
        while state["stage_epoch"] < stage_epochs:
            e = state["stage_epoch"]
            first_step = e * steps_per_epoch
            n_steps = min(steps_per_epoch, stage_steps - first_step)
            partial = state.pop("partial", None) or {"steps": 0, "loss_sum": 0.0, "correct": 0.0, "seen": 0.0,
                                                      "seconds": 0.0}
            if not partial["steps"]:
                torch.manual_seed(cfg["seed"] * 100_003 + state["epoch"])  # (else: the checkpoint's RNG state)
            train_loader.set_epoch(state["epoch"])
            net.train()
            loss_sum, correct, seen = partial["loss_sum"], partial["correct"], partial["seen"]
            t0 = time.time() - partial["seconds"]
            bar = tqdm(total=n_steps, initial=partial["steps"], disable=not info.is_main, leave=False,
                       mininterval=1 if sys.stderr.isatty() else 30,
                       desc=f"{run_dir.parent.name}/{run_dir.name} {stage.name} epoch {state['epoch'] + 1}")
            for i, (images, labels) in enumerate(train_loader):
                if i >= n_steps:
                    break
                if i < partial["steps"]:  # done before the mid-epoch checkpoint: same batches, same order
                    continue
                images, labels = images.to(info.device, non_blocking=True), labels.to(info.device, non_blocking=True)
                lr = set_lr(optimizer, lr_factor(stage, first_step + i, stage_steps, steps_per_epoch))
                with _autocast(info, amp):
                    logits = net(images)
                    teacher_logits = None
                    if teacher is not None and stage.loss != "ce":
                        with torch.no_grad():
                            teacher_logits = teacher(images)
                loss = stage_loss(stage, logits, labels, teacher_logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * labels.numel()
                correct += (logits.argmax(1) == labels).sum().item()
                seen += labels.numel()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                if every and (i + 1) % every == 0 and i + 1 < n_steps:
                    if info.is_main:
                        done = {"steps": i + 1, "loss_sum": loss_sum, "correct": correct, "seen": seen,
                                "seconds": time.time() - t0}
                        save_checkpoint({**state, "partial": done, "wall_seconds": time.time() - started}, optimizer)
                    distributed.barrier(info)
            bar.close()
            state["train_seconds"] += time.time() - t0
            state["images"] += int(seen) * info.world_size
            val = evaluate(model, val_loader, info, amp)
            row = {"epoch": state["epoch"] + 1, "stage": stage.name, "train_loss": loss_sum / max(seen, 1),
                   "train_top1": 100.0 * correct / max(seen, 1), "val_top1": val["top1"], "val_top5": val["top5"],
                   "val_loss": val["loss"], "lr": lr}
            state["history"].append(row)
            if si == last and (state["best"] is None or val["top1"] > state["best"]["val_top1"]):
                state["best"] = {"epoch": row["epoch"], "val_top1": val["top1"]}
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            state["epoch"] += 1
            state["stage_epoch"] += 1
            if state["stage_epoch"] == stage_epochs:
                state["stage"], state["stage_epoch"] = si + 1, 0
            state["wall_seconds"] = time.time() - started
            if info.is_main:
                live.log(row)
                save_checkpoint(state, optimizer)
                print(f"{run_dir}: epoch {row['epoch']} [{stage.name}] loss {row['train_loss']:.4f} "
                      f"val top-1 {val['top1']:.2f}", file=sys.stderr)
            distributed.barrier(info)
            if state["stage"] != si:
                break
        optimizer_state = None

    final_test = evaluate(model, test_loader, info, amp)
    final_val = state["history"][-1]
    final_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    best_test = evaluate(model, test_loader, info, amp)
    model.load_state_dict(final_state)
    metrics = {
        "hash": cfg["hash"], "dataset": cfg["dataset"], "arch": cfg["arch"], "method": cfg["method"],
        "variant": cfg["variant"], "seed": cfg["seed"],
        "test_top1": final_test["top1"], "test_top5": final_test["top5"], "test_loss": final_test["loss"],
        "val_top1": final_val["val_top1"],
        "best_val_epoch": state["best"]["epoch"], "best_val_top1": state["best"]["val_top1"],
        "test_top1_at_best_val": best_test["top1"], "test_top5_at_best_val": best_test["top5"],
        "epochs": state["epoch"], "recipe_epochs": recipe.epochs, "steps_per_epoch": steps_per_epoch,
        "wall_seconds": time.time() - started, "train_seconds": state["train_seconds"],
        "images_per_second": state["images"] / max(state["train_seconds"], 1e-9),
        "device": _device_name(info), "world_size": info.world_size, "test_samples": final_test["samples"],
    }
    metrics = distributed.broadcast_object(metrics, info)  # per-rank timings differ: every rank returns rank 0's
    if info.is_main:
        live.close()
        atomic_torch_save(run_dir / MODEL, model.state_dict())
        atomic_write_json(run_dir / METRICS, metrics)
    distributed.barrier(info)
    return metrics


def _on_device(loader, info: distributed.DistInfo, limit: int):
    for i, (images, labels) in enumerate(loader):
        if i >= limit:
            break
        yield images.to(info.device), labels.to(info.device)


class TrainJob(submitit.helpers.Checkpointable):
    """A run as a submitit job. On preemption or time-out submitit calls `checkpoint()`, which resubmits the same
    job; the requeued job resumes from the run directory's last checkpoint."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def __call__(self) -> dict[str, Any]:
        return train(self.config)


# ----------------------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", help="prepared shards (default: data/<dataset>)")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--method", default="fp")
    p.add_argument("--variant", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--run-dir", help="default: <runs-root>/<dataset>/<arch>/<method>[-<variant>]/seed<k>")
    p.add_argument("--teacher-run", help="finished run used as teacher (default: the fp run beside this one)")
    p.add_argument("--init-run", help="finished run to start from (default: the fp run beside this one)")
    p.add_argument("--checkpoint-steps", type=int, default=0, metavar="N",
                   help="also checkpoint every N training steps within an epoch, so a killed or preempted run loses "
                        "at most N steps (default 0: at epoch ends only; not part of the config hash)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override, e.g. --set epochs=2 --set max_batches=50 (repeatable)")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings into typed values (YAML scalars: 2 → int, 0.5 → float, true → bool)."""
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise BitbenchError(f"override {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    run_dir = args.run_dir or run_dir_for(args.runs_root, args.dataset, args.arch, args.method, args.variant,
                                          args.seed)
    cfg = resolve_config({
        "dataset": args.dataset, "data_dir": args.data_dir or f"data/{args.dataset}", "arch": args.arch,
        "method": args.method, "variant": args.variant, "seed": args.seed, "run_dir": str(run_dir),
        "overrides": parse_overrides(args.set), "teacher_run": args.teacher_run, "init_run": args.init_run,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")), "checkpoint_steps": args.checkpoint_steps,
    })
    metrics = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))
    return 0
