"""Binary export: every binary layer as packed sign bits (1 bit per weight) plus a per-output-channel scale,
everything else as float tensors, and the inference model rebuilt from that export alone (no latent weights).

A layer counts as binary only if `quantized_weight()` really is scale[c]·(±1): every |w| of an output channel
equal. A layer that claims binary weights but fails this is exported as its float forward weight and listed
under `not_binary`, so the rebuilt model still computes the same thing while the audit reports the false claim.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from baselines.layers import binary_layers
from benchmark.checkpoint import atomic_torch_save
from benchmark.errors import BitbenchError
from benchmark.ops import latent_only_parameters

FORMAT = "bitbench-binary-export"
VERSION = 1
MODEL_KEYS = ("method", "arch", "num_classes", "in_channels", "image_size", "variant")

__all__ = ["FORMAT", "FrozenBinaryWeight", "pack_signs", "unpack_signs", "binary_check", "export_binary",
           "rebuild", "save_export", "load_export", "export_sizes"]


class FrozenBinaryWeight(nn.Module):
    """Weight quantizer of a rebuilt layer: its weight already is scale·(±1), so the forward uses it as is."""

    scaled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach().abs().flatten(1).amax(dim=1)


def pack_signs(w: torch.Tensor) -> torch.Tensor:
    """1 bit per element, MSB first: 1 where w >= 0 (sign(0) = +1, the suite's convention), as uint8."""
    bits = (w.detach().flatten() >= 0).cpu().numpy()
    return torch.from_numpy(np.packbits(bits))


def unpack_signs(packed: torch.Tensor, shape: tuple[int, ...] | list[int], dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor:
    """The ±1 tensor of `shape` that `pack_signs` packed."""
    count = int(np.prod(shape))
    if packed.dtype != torch.uint8 or packed.numel() != (count + 7) // 8:
        raise BitbenchError(f"packed bits do not fit shape {tuple(shape)}: {packed.numel()} {packed.dtype} bytes, "
                            f"need {(count + 7) // 8} uint8")
    bits = np.unpackbits(packed.numpy(), count=count)
    return torch.from_numpy(bits.astype(np.float32) * 2 - 1).to(dtype).view(*shape)


def binary_check(q: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor | None, str]:
    """(per-output-channel scale, '') when every |q| of each output channel is equal, else (None, reason)."""
    low, scale = torch.aminmax(q.detach().abs().flatten(1), dim=1)
    if not torch.isfinite(scale).all():  # amax propagates NaN and inf
        return None, "weight has non-finite values"
    bad = scale - low > rtol * scale
    if bad.any():
        c = int(bad.nonzero()[0])
        return None, (f"|w| differs within output channel {c} (min {low[c].item():.6g}, max {scale[c].item():.6g}"
                      f"; {int(bad.sum())} of {len(scale)} channels non-uniform)")
    return scale.clone(), ""


def _quantizer_prefixes(model: nn.Module) -> list[str]:
    return [f"{name}.weight_quantizer." for name, layer in binary_layers(model)
            if layer.binarize_weights and layer.weight_quantizer is not None]


def export_binary(model: nn.Module, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export `model` (its current binarization modes): packed bits + scales for binary layers, float tensors
    for all other state. `spec` (method, arch, num_classes, in_channels, image_size, variant) lets `rebuild`
    build the architecture with `create_model`; without it `rebuild` needs a `build` factory."""
    if spec is not None:
        missing = [k for k in MODEL_KEYS if k not in spec]
        if missing:
            raise BitbenchError(f"export spec is missing {', '.join(missing)}")
        spec = {k: spec[k] for k in MODEL_KEYS}
    binary: dict[str, dict[str, Any]] = {}
    quantized: dict[str, torch.Tensor] = {}
    not_binary: dict[str, str] = {}
    modes: dict[str, dict[str, bool]] = {}
    for name, layer in binary_layers(model):
        modes[name] = {"binarize_inputs": bool(layer.binarize_inputs), "binarize_weights": bool(layer.binarize_weights)}
        if not layer.binarize_weights:
            continue
        with torch.no_grad():
            q = layer.quantized_weight().detach()
        scale, reason = binary_check(q)
        if scale is None:
            not_binary[name] = reason
            quantized[name] = q.cpu().clone()
        else:
            binary[name] = {"bits": pack_signs(q), "shape": list(q.shape), "scale": scale.cpu(),
                            "dtype": str(q.dtype).removeprefix("torch.")}
    skip_prefixes = _quantizer_prefixes(model)
    weight_keys = {f"{name}.weight" for name in (*binary, *quantized)}
    floats = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
              if k not in weight_keys and not any(k.startswith(p) for p in skip_prefixes)}
    return {"format": FORMAT, "version": VERSION, "model": spec, "binary": binary, "quantized": quantized,
            "not_binary": not_binary, "modes": modes, "float": floats}


def rebuild(export: dict[str, Any], build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """The eval-mode inference model described by `export` alone: the architecture from `create_model` (or
    `build()`), every float tensor loaded, and each binary layer's weight set to scale·unpack(bits) behind a
    `FrozenBinaryWeight` quantizer. Every state tensor must come from the export (checked)."""
    if export.get("format") != FORMAT or export.get("version") != VERSION:
        raise BitbenchError(f"not a {FORMAT} v{VERSION} file (format {export.get('format')!r}, "
                            f"version {export.get('version')!r})")
    if build is not None:
        model = build()
    elif export.get("model"):
        from benchmark.models import create_model

        model = create_model(**export["model"])
    else:
        raise BitbenchError("the export names no registry model (method/arch); pass a `build` factory to rebuild it")
    layers = dict(binary_layers(model))
    frozen = {**{n: None for n in export["binary"]}, **{n: None for n in export["quantized"]}}
    missing_layers = sorted(set(export["modes"]) ^ set(layers))
    if missing_layers:
        raise BitbenchError(f"export and architecture disagree on binary layers: {', '.join(missing_layers[:5])}")
    for name in frozen:
        layers[name].weight_quantizer = FrozenBinaryWeight()
    result = model.load_state_dict(export["float"], strict=False)
    expected_missing = {f"{name}.weight" for name in frozen}
    if result.unexpected_keys or set(result.missing_keys) != expected_missing:
        extra = sorted(set(result.missing_keys) - expected_missing) + sorted(result.unexpected_keys)
        raise BitbenchError(f"export does not match the architecture: {', '.join(extra[:5])}")
    with torch.no_grad():
        for name, layer in layers.items():
            mode = export["modes"][name]
            layer.binarize_inputs = mode["binarize_inputs"]
            layer.binarize_weights = mode["binarize_weights"]
            if name in export["binary"]:
                entry = export["binary"][name]
                signs = unpack_signs(entry["bits"], entry["shape"], getattr(torch, entry["dtype"]))
                weight = entry["scale"].to(signs.dtype).view(-1, *[1] * (signs.dim() - 1)) * signs
            elif name in export["quantized"]:
                weight = export["quantized"][name]
            else:
                continue
            if weight.shape != layer.weight.shape:
                raise BitbenchError(f"export weight of {name} has shape {tuple(weight.shape)}, "
                                    f"the layer {tuple(layer.weight.shape)}")
            layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
    return model.eval()


def export_sizes(model: nn.Module, export: dict[str, Any]) -> dict[str, int]:
    """Storage of the model's parameters: packed (bits + fp32 scales + fp32 other parameters) against all-fp32.
    Training-only parameters of binary layers' weight quantizers count in neither."""
    latent = latent_only_parameters(model)
    params = [(n, p) for n, p in model.named_parameters() if id(p) not in latent]
    exported_weights = {f"{name}.weight" for name in export["binary"]}
    fp_params = sum(p.numel() for n, p in params if n not in exported_weights)
    bits_bytes = sum(e["bits"].numel() for e in export["binary"].values())
    scale_bytes = 4 * sum(e["scale"].numel() for e in export["binary"].values())
    return {"packed_bytes": bits_bytes + scale_bytes + 4 * fp_params, "fp32_bytes": 4 * sum(p.numel() for _, p in params),
            "bits_bytes": bits_bytes, "scale_bytes": scale_bytes, "fp_param_bytes": 4 * fp_params}


def save_export(export: dict[str, Any], path: str | Path) -> int:
    """Write the export atomically; returns the file size in bytes."""
    atomic_torch_save(path, export)
    return Path(path).stat().st_size


def load_export(path: str | Path) -> dict[str, Any]:
    """Read an export written by `save_export` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise BitbenchError(f"no export file at {path}")
    try:
        export = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise BitbenchError(f"cannot read export {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(export, dict) or export.get("format") != FORMAT:
        raise BitbenchError(f"{path} is not a {FORMAT} file")
    return export
