"""Atomic writes and loading a finished run's model (teachers, BiTAT's starting point, the export audit)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.errors import BitbenchError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_model(cfg: dict[str, Any]) -> nn.Module:
    """The model a run config describes (fresh weights)."""
    from benchmark.models import create_model

    return create_model(cfg["method"], cfg["arch"], num_classes=cfg["num_classes"],
                        in_channels=cfg["in_channels"], image_size=cfg["image_size"], variant=cfg["variant"])


def load_run_model(run_dir: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The final model of a finished run, in eval mode, with its config."""
    run_dir = Path(run_dir)
    cfg_path, model_path = run_dir / "config.json", run_dir / "model.pt"
    if not cfg_path.is_file() or not model_path.is_file():
        raise BitbenchError(f"{run_dir} is not a finished run (needs config.json and model.pt)")
    cfg = json.loads(cfg_path.read_text())
    model = build_model(cfg)
    state = torch.load(model_path, map_location=map_location, weights_only=True)
    _apply_final_stage(model, cfg)
    model.load_state_dict(state)
    return model.eval(), cfg


def _apply_final_stage(model: nn.Module, cfg: dict[str, Any]) -> None:
    """Put the model in the structural mode its recipe ends in (e.g. ReActNet step 2: binary weights)."""
    from benchmark.runs import resolve_recipe

    for stage in resolve_recipe(cfg["method"], cfg["variant"], cfg["dataset"], cfg.get("overrides", {})).stages:
        if stage.apply is not None:
            stage.apply(model)
