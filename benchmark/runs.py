"""Run configs: resolve a grid cell into a full, validated config with a content hash, and where its run lives.

A run is (dataset, architecture, method, variant, seed, recipe overrides). Everything that changes the result
goes into the hash; where the run directory is does not, so a finished run is recognised wherever it is.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from baselines.recipe import Recipe
from benchmark.errors import BitbenchError

DATASET_FAMILY = {"fashion-mnist": "mnist", "cifar10": "cifar", "cifar100": "cifar", "imagenet": "imagenet"}
OVERRIDE_KEYS = {"epochs", "batch_size", "lr_scale", "max_batches", "eval_max_batches", "workers", "teacher",
                 "world_size", "amp", "image_size"}
HASHED_KEYS = ("dataset", "data_hash", "arch", "method", "variant", "seed", "world_size", "recipe", "overrides",
               "num_classes", "in_channels", "image_size", "dependency_hashes")
DEPENDENCY_ROLES = ("teacher_run", "init_run")


def load_params(path: str | Path, require_grid: bool = True) -> dict[str, Any]:
    """A params file (params.yaml) as a mapping; raises naming the file when it is missing or malformed, or has
    no `grid:` section (optional with `require_grid=False`: the launcher may get its grid from the command line)."""
    from benchmark.yamlfile import read_yaml

    params = read_yaml(path, "params file") or {}
    if not isinstance(params, dict) or not isinstance(params.get("grid", None if require_grid else {}), dict):
        raise BitbenchError(f"params file {path} has no `grid:` section (datasets, archs, methods, seeds)")
    return params


def run_name(method: str, variant: str | None) -> str:
    return method if not variant else f"{method}-{variant}"


def run_dir_for(runs_root: str | Path, dataset: str, arch: str, method: str, variant: str | None,
                seed: int) -> Path:
    """`<runs_root>/<dataset>/<arch>/<method>[-<variant>]/seed<k>`."""
    return Path(runs_root) / dataset / arch / run_name(method, variant) / f"seed{seed}"


def resolve_recipe(method: str, variant: str | None, dataset: str, overrides: dict[str, Any]) -> Recipe:
    """The method's recipe for the dataset's family, with the run's overrides applied."""
    from benchmark.models import get_method

    spec = get_method(method)
    recipe = spec.recipe(DATASET_FAMILY[dataset], variant or spec.default_variant)
    teacher = overrides.get("teacher", "keep")
    return recipe.with_overrides(epochs=overrides.get("epochs"), lr_scale=overrides.get("lr_scale"),
                                 batch_size=overrides.get("batch_size"), teacher=teacher)


def resolve_config(spec: dict[str, Any], check_dependencies: bool = True) -> dict[str, Any]:
    """Validate a grid cell and fill in everything the run needs; raises BitbenchError naming what is wrong.

    With `check_dependencies=False` a missing teacher/init run is accepted (the launcher schedules it first).
    """
    from benchmark.data import load_manifest
    from benchmark.models import get_method

    cfg = {"variant": None, "seed": 0, "overrides": {}, "teacher_run": None, "init_run": None}
    cfg.update({k: v for k, v in spec.items() if v is not None or k not in cfg})
    for key in ("dataset", "data_dir", "arch", "method", "run_dir"):
        if not cfg.get(key):
            raise BitbenchError(f"run config is missing {key!r}")
    if cfg["dataset"] not in DATASET_FAMILY:
        raise BitbenchError(f"unknown dataset {cfg['dataset']!r} (valid: {', '.join(DATASET_FAMILY)})")
    unknown = set(cfg["overrides"]) - OVERRIDE_KEYS
    if unknown:
        raise BitbenchError(f"unknown override(s) {', '.join(sorted(unknown))} (valid: {', '.join(sorted(OVERRIDE_KEYS))})")
    method = get_method(cfg["method"])  # raises with the valid choices
    cfg["variant"] = cfg["variant"] or method.default_variant
    if cfg["variant"] not in method.variants:
        raise BitbenchError(f"unknown variant {cfg['variant']!r} of method {cfg['method']!r} "
                            f"(valid: {', '.join(method.variants)})")
    from benchmark.models import check_arch

    check_arch(cfg["arch"])
    manifest_path = Path(cfg["data_dir"]) / "manifest.json"
    if not manifest_path.is_file():
        raise BitbenchError(f"no dataset shards at {cfg['data_dir']} (missing manifest.json): "
                            f"run `bitbench prepare --dataset {cfg['dataset']} --out {cfg['data_dir']}` first")
    manifest = load_manifest(cfg["data_dir"], verify="none")
    if manifest.get("dataset") != cfg["dataset"]:
        raise BitbenchError(f"{manifest_path} holds {manifest.get('dataset')!r}, not {cfg['dataset']!r}")
    cfg["data_hash"] = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    cfg["num_classes"] = len(manifest["classes"])
    cfg["in_channels"] = int(manifest["channels"])
    cfg["image_size"] = int(cfg["overrides"].get("image_size", manifest["image_size"]))
    cfg["world_size"] = int(cfg["overrides"].get("world_size", cfg.get("world_size") or 1))
    recipe = resolve_recipe(cfg["method"], cfg["variant"], cfg["dataset"], cfg["overrides"])
    cfg["recipe"] = recipe.describe()
    for role, kind in zip(DEPENDENCY_ROLES, (recipe.teacher, recipe.init_from)):
        if kind is None or kind.startswith("torchvision:"):
            cfg[role] = None
            continue
        if not cfg.get(role):
            cfg[role] = str(run_dir_for(Path(cfg["run_dir"]).parents[3], cfg["dataset"], cfg["arch"], kind, None,
                                        cfg["seed"]))
        if check_dependencies and not (Path(cfg[role]) / "model.pt").is_file():
            raise BitbenchError(f"{cfg['method']} needs the finished {kind!r} run of {cfg['dataset']}/{cfg['arch']} "
                                f"seed {cfg['seed']} as its {role.split('_')[0]}: run it first (missing {cfg[role]}/model.pt)")
    if recipe.teacher and recipe.teacher.startswith("torchvision:"):
        check_torchvision_teacher(recipe.teacher)
    cfg["run_dir"] = str(cfg["run_dir"])
    cfg["data_dir"] = str(cfg["data_dir"])
    # a teacher or starting point that changes makes a new run: its config hash is part of this one's
    cfg["dependency_hashes"] = {role: finished_hash(cfg[role]) for role in DEPENDENCY_ROLES if cfg.get(role)}
    cfg["hash"] = config_hash(cfg)
    return cfg


def finished_hash(run_dir: str | Path) -> str | None:
    """The config hash a finished run directory was trained with (None while it is not finished)."""
    try:
        return json.loads((Path(run_dir) / "metrics.json").read_text()).get("hash")
    except (OSError, json.JSONDecodeError):
        return None


def config_hash(cfg: dict[str, Any]) -> str:
    payload = json.dumps({k: cfg.get(k) for k in HASHED_KEYS}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def dependencies(cfg: dict[str, Any]) -> list[str]:
    """Run directories this run needs finished before it starts (teacher, initial checkpoint)."""
    return [cfg[role] for role in DEPENDENCY_ROLES if cfg.get(role)]


def set_dependency_hash(cfg: dict[str, Any], run_dir: str | Path, dependency_hash: str) -> None:
    """Record the config hash the dependency at `run_dir` will have (the launcher knows it before it has run)
    and rehash `cfg`."""
    for role in DEPENDENCY_ROLES:
        if cfg.get(role) and Path(cfg[role]).resolve() == Path(run_dir).resolve():
            cfg["dependency_hashes"][role] = dependency_hash
    cfg["hash"] = config_hash(cfg)


def is_finished(run_dir: str | Path, config_hash_: str) -> bool:
    """True when the run directory holds final metrics for exactly this config."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("hash") == config_hash_
    except (OSError, json.JSONDecodeError):
        return False


def check_torchvision_teacher(name: str) -> None:
    """A torchvision teacher must have its pretrained weights on local disk (no downloads at run time)."""
    import torch
    import torchvision

    arch = name.split(":", 1)[1]
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not path.is_file():
        raise BitbenchError(f"teacher {name} needs pretrained weights at {path} (not downloaded here); "
                            f"copy them there or override the teacher with 'fp'")
