"""`bitbench audit`: prove a model's binary claim. Export its binary layers as packed bits (benchmark.export),
rebuild an inference model from the export alone, and require the rebuilt logits to match the original's.

Works on a finished run (`--run DIR`) or on a freshly built model (same flags as `bitbench ops`; random init,
BN running statistics made non-trivial by a few train-mode passes on random data).
"""
from __future__ import annotations

import argparse
import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from baselines.layers import binary_layers
from benchmark.errors import BitbenchError
from benchmark.export import export_binary, export_sizes, load_export, rebuild, save_export
from benchmark.ops import add_model_arguments

TOLERANCE = 1e-4

__all__ = ["TOLERANCE", "audit_model", "prime_batchnorm", "random_inputs"]


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """No parameter requires grad for the duration (quantizers may then cache their output), flags restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def random_inputs(input_shape: tuple[int, ...], batch_size: int = 8, seed: int = 0) -> torch.Tensor:
    """A reproducible standard-normal batch (N, C, H, W), like normalised images."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *input_shape), generator=gen)


@torch.no_grad()
def prime_batchnorm(model: nn.Module, input_shape: tuple[int, ...], steps: int = 3, batch_size: int = 8,
                    seed: int = 0) -> nn.Module:
    """Give a freshly initialised model non-trivial BN running statistics (train-mode passes on random data)
    and jitter parameters that start constant (BN affine, ReActNet biases, PReLU slopes), so that a tensor
    lost in the export would change the logits. Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.numel() > 0 and torch.all(p == p.flatten()[0]):
                p.add_(0.1 * torch.randn(p.shape, generator=gen).to(p))
    model.train()
    with _inference(model):
        for step in range(steps):
            model(random_inputs(input_shape, batch_size, seed + 100 + step))
    return model.eval()


def _fp_layer_names(model: nn.Module, binary: set[str]) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (_ConvNd, nn.Linear)) and name not in binary]


def audit_model(model: nn.Module, input_shape: tuple[int, ...] | None = None, *, inputs: torch.Tensor | None = None,
                spec: dict[str, Any] | None = None, build: Callable[[], nn.Module] | None = None,
                out: str | Path | None = None, tolerance: float = TOLERANCE, batch_size: int = 8,
                seed: int = 0) -> dict[str, Any]:
    """Export `model` (eval mode, current binarization modes), rebuild it from the export and compare logits.

    The architecture for the rebuild comes from `spec` (registry model), else `build()`, else a deep copy of
    `model` whose every state tensor is then replaced from the export. With `out` the export is written there
    and the rebuild reads the file back. `inputs` default to a random batch of `input_shape`.
    Returns a JSON-able report; `passed` is False when a claimed binary layer is not binary or the largest
    absolute logit difference is not below `tolerance`.
    """
    if inputs is None:
        if input_shape is None:
            raise BitbenchError("audit_model needs input_shape or inputs")
        inputs = random_inputs(tuple(input_shape), batch_size, seed)
    model.eval()
    with _inference(model):
        return _audit(model, inputs, spec, build, out, tolerance)


def _audit(model: nn.Module, inputs: torch.Tensor, spec: dict[str, Any] | None,
           build: Callable[[], nn.Module] | None, out: str | Path | None, tolerance: float) -> dict[str, Any]:
    export = export_binary(model, spec)
    export_file_bytes = None
    if out is not None:
        export_file_bytes = save_export(export, out)
        export = load_export(out)
    if build is None and spec is None:
        build = lambda: copy.deepcopy(model)  # noqa: E731 - structure only; all state is replaced from the export
    rebuilt = rebuild(export, build)
    # the rebuilt model must itself export to the same bits and scales: no latent weight survived
    again = export_binary(rebuilt)
    consistent = set(again["binary"]) == set(export["binary"]) and all(
        torch.equal(again["binary"][n]["bits"], e["bits"]) and torch.equal(again["binary"][n]["scale"], e["scale"])
        for n, e in export["binary"].items())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        original = model(inputs.to(device)).float().cpu()
        restored = rebuilt.to(device)(inputs.to(device)).float().cpu()
    diff = (original - restored).abs().max().item() if original.numel() else 0.0
    finite = bool(torch.isfinite(original).all() and torch.isfinite(restored).all())

    modes = export["modes"]
    binary = [n for n in export["binary"] if modes[n]["binarize_inputs"]]
    weights_only = [n for n in export["binary"] if not modes[n]["binarize_inputs"]]
    problems = [f"layer {name} claims binary weights but is not binary: {why}"
                for name, why in export["not_binary"].items()]
    if not consistent:
        problems.append("the rebuilt model does not re-export to the same bits and scales")
    if not finite:
        problems.append("logits are not finite")
    elif not diff < tolerance:
        problems.append(f"rebuilt logits differ from the original by {diff:.3g} (tolerance {tolerance:g})")
    sizes = export_sizes(model, export)
    report = {
        "binary_layers": len(binary),
        "binary_layer_names": binary,
        "binary_weight_only_layers": weights_only,
        "not_binary": export["not_binary"],
        "fp_layers": _fp_layer_names(model, set(export["binary"])),
        "binary_conv2d_modules": len(binary_layers(model)),
        **sizes,
        "compression": sizes["fp32_bytes"] / sizes["packed_bytes"] if sizes["packed_bytes"] else None,
        "export_file_bytes": export_file_bytes,
        "max_abs_logit_diff": diff,
        "tolerance": tolerance,
        "batch": list(inputs.shape),
        "passed": not problems,
        "problems": problems,
    }
    return report


def _val_batch(cfg: dict[str, Any], batch_size: int) -> torch.Tensor | None:
    """The first `batch_size` images of the run's val split, or None when its shards are not here."""
    data_dir = Path(cfg.get("data_dir") or "")
    if not cfg.get("data_dir") or not (data_dir / "manifest.json").is_file():
        return None
    from benchmark.data import ShardLoader

    loader = ShardLoader(data_dir, "val", batch_size, train=False, image_size=cfg.get("image_size"), num_workers=0,
                         max_batches=1)
    for images, _ in loader:
        return images
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, help="a finished run directory (config.json + model.pt)")
    add_model_arguments(parser, required=False)
    parser.add_argument("--out", type=Path, help="export file (default: <run>/export.pt with --run, else none)")
    parser.add_argument("--batch-size", type=int, default=16, help="images compared (default 16)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help=f"largest logit difference (default {TOLERANCE:g})")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise BitbenchError(f"--batch-size must be positive, got {args.batch_size}")
    if not args.tolerance > 0:
        raise BitbenchError(f"--tolerance must be positive, got {args.tolerance}")
    inputs = None
    if args.run is not None:
        from benchmark.checkpoint import load_run_model

        model, cfg = load_run_model(args.run)
        spec = {k: cfg[k] for k in ("method", "arch", "num_classes", "in_channels", "image_size", "variant")}
        out = args.out or args.run / "export.pt"
        inputs = _val_batch(cfg, args.batch_size)
        source = "val split" if inputs is not None else "random"
    else:
        if not args.method or not args.arch:
            raise BitbenchError("give --run DIR, or --method and --arch for a freshly built model")
        from benchmark.models import check_variant, create_model, get_method

        spec = {"method": args.method, "arch": args.arch, "num_classes": args.num_classes,
                "in_channels": args.in_channels, "image_size": args.image_size,
                "variant": check_variant(get_method(args.method), args.variant)}
        torch.manual_seed(args.seed)
        model = prime_batchnorm(create_model(**spec), (args.in_channels, args.image_size, args.image_size),
                                seed=args.seed)
        out, source = args.out, "random"
    shape = (spec["in_channels"], spec["image_size"], spec["image_size"])
    report = audit_model(model, shape, inputs=inputs, spec=spec, out=out, tolerance=args.tolerance,
                         batch_size=args.batch_size, seed=args.seed)
    report = {"model": spec, "inputs": source, "export": str(out) if out else None, **report}
    print(json.dumps(report, indent=2))
    if not report["passed"]:
        raise BitbenchError("audit failed: " + "; ".join(report["problems"]))
    return 0
