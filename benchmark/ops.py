"""`bitbench ops`: BOPs, FLOPs, OPs = BOPs/64 + FLOPs (the Bi-Real/ReActNet convention) and parameter counts,
traced from a real forward pass with hooks on the model's own modules (methods.md §1.5).

Counting rule: 1 MAC = 1 FLOP; a MAC of a convolution whose inputs AND weights are binary is 1 BOP; every
other convolution (stem, downsample 1×1, ReActNet step 1's binary-input/real-weight convs) and every Linear
count as FLOPs; BN, additions, pooling, biases, scales and activations are not counted. XNOR-Net's activation
scale K (computed from the input at run time) is reported apart as `activation_scale_flops`, outside `ops`.

At 224 px this gives ReActNet-A 0.871e8 OPs (4.817e9 BOPs), Bi-Real-18 1.640e8 and XNOR-Net ResNet-18 1.640e8
(the same layer shapes: stem, three 1×1 downsample convs and FC real). The published XNOR-18 figure, 1.67e8,
is reproduced (1.673e8) only when K's cost is added as FLOPs (channel mean of |I|, k×k box filter, K times
the output: 3.3e6 per image), i.e. the published XNOR number counts the K scaling and the Bi-Real one does not.
"""
from __future__ import annotations

import argparse
import json
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from baselines.layers import BinaryConv2d
from benchmark.errors import BitbenchError

BOPS_PER_OP = 64  # one 64-bit XNOR + popcount word counts as one operation

__all__ = ["BOPS_PER_OP", "count_model_ops", "count_ops", "is_binary_conv", "has_binary_weights",
           "latent_only_parameters"]


def is_binary_conv(module: nn.Module) -> bool:
    """A convolution whose MACs are BOPs: binary inputs and binary weights."""
    return isinstance(module, BinaryConv2d) and module.binarize_inputs and module.binarize_weights


def has_binary_weights(module: nn.Module) -> bool:
    """A convolution whose forward uses binarized weights (stored as 1 bit each)."""
    return isinstance(module, BinaryConv2d) and module.binarize_weights


def latent_only_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters held by binary layers' weight quantizers: training-only state that the
    deployed (packed) model does not contain."""
    return {id(p) for m in model.modules() if has_binary_weights(m) and m.weight_quantizer is not None
            for p in m.weight_quantizer.parameters()}


def _conv_macs(conv: _ConvNd, x: torch.Tensor, out: torch.Tensor) -> int:
    """MACs of one image through `conv`: each output element sums (C_in/groups)·prod(kernel) products."""
    n = out.shape[0]
    kernel = math.prod(conv.kernel_size)
    if conv.transposed:  # each input element is spread over (C_out/groups)·prod(kernel) outputs
        return x[0].numel() * (conv.out_channels // conv.groups) * kernel
    return (out.numel() // n) * (conv.in_channels // conv.groups) * kernel


def _xnor_scale_flops(conv: BinaryConv2d, x: torch.Tensor, out: torch.Tensor) -> int:
    """FLOPs of XNOR's K per image: the channel mean of |I|, the k×k box filter over it, and K times the output."""
    n = out.shape[0]
    spatial_out = math.prod(out.shape[2:])
    return x[0].numel() + conv.groups * spatial_out * math.prod(conv.kernel_size) + out.numel() // n


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (BN with batch 1), restoring every module's own training flag after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def count_model_ops(model: nn.Module, input_shape: tuple[int, ...], per_layer: bool = False) -> dict[str, Any]:
    """Count one image's cost through `model`; `input_shape` is (C, H, W) (a leading batch dim of 1 is accepted).

    Returns bops, flops, ops, activation_scale_flops, params, binary_params, fp_params, packed_bytes
    (1 bit per binary weight, 4 bytes per other parameter, rounded up), binary_layers, fp_conv_layers and
    linear_layers (modules that ran, counted once each), and with `per_layer` a list of every call.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3 or min(shape) < 1:
        raise BitbenchError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    calls: list[dict[str, Any]] = []
    seen_binary: set[str] = set()
    seen_fp_conv: set[str] = set()
    seen_linear: set[str] = set()

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
            x = inputs[0]
            scale_flops = 0
            if isinstance(module, nn.Linear):
                kind, macs = "linear", (out.numel() // out.shape[0]) * module.in_features
                seen_linear.add(name)
            elif is_binary_conv(module):
                kind, macs = "binary", _conv_macs(module, x, out)
                if module.activation_scale is not None:
                    scale_flops = _xnor_scale_flops(module, x, out)
                seen_binary.add(name)
            else:
                kind, macs = "fp_conv", _conv_macs(module, x, out)
                seen_fp_conv.add(name)
            calls.append({"name": name, "kind": kind, "macs": macs, "activation_scale_flops": scale_flops,
                          "output_shape": list(out.shape[1:])})
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (_ConvNd, nn.Linear))]
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        with _eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()

    bops = sum(c["macs"] for c in calls if c["kind"] == "binary")
    flops = sum(c["macs"] for c in calls if c["kind"] != "binary")
    latent = latent_only_parameters(model)
    binary_weights = {id(m.weight) for m in model.modules() if has_binary_weights(m)}
    params = binary_params = 0
    for p in model.parameters():
        if id(p) in latent:
            continue
        params += p.numel()
        if id(p) in binary_weights:
            binary_params += p.numel()
    fp_params = params - binary_params
    result: dict[str, Any] = {
        "bops": bops,
        "flops": flops,
        "ops": bops / BOPS_PER_OP + flops,
        "activation_scale_flops": sum(c["activation_scale_flops"] for c in calls),
        "params": params,
        "binary_params": binary_params,
        "fp_params": fp_params,
        "packed_bytes": math.ceil(binary_params / 8) + 4 * fp_params,
        "fp32_bytes": 4 * params,
        "binary_layers": len(seen_binary),
        "fp_conv_layers": len(seen_fp_conv),
        "linear_layers": len(seen_linear),
        "input_shape": list(shape),
    }
    if per_layer:
        result["layers"] = calls
    return result


def count_ops(method: str, arch: str, num_classes: int, image_size: int, in_channels: int = 3,
              variant: str | None = None, per_layer: bool = False) -> dict[str, Any]:
    """`count_model_ops` on a freshly built registry model (`benchmark.models.create_model`)."""
    from benchmark.models import check_variant, create_model, get_method

    variant = check_variant(get_method(method), variant)
    model = create_model(method, arch, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                         variant=variant)
    counts = count_model_ops(model, (in_channels, image_size, image_size), per_layer=per_layer)
    return {"method": method, "arch": arch, "variant": variant, "num_classes": num_classes,
            "in_channels": in_channels, "image_size": image_size, **counts}


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The flags that name a registry model (shared with `bitbench audit`)."""
    parser.add_argument("--method", required=required, help="method name (see `bitbench models`)")
    parser.add_argument("--arch", required=required, help="architecture name (see `bitbench models`)")
    parser.add_argument("--variant", default=None, help="method variant (default: the method's default)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument("--image-size", type=int, default=224, help="input height = width (default 224)")
    parser.add_argument("--in-channels", type=int, default=3, help="input channels (default 3)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--per-layer", action="store_true", help="also list every conv/linear call and its MACs")


def run(args: argparse.Namespace) -> int:
    for flag in ("num_classes", "image_size", "in_channels"):
        if getattr(args, flag) < 1:
            raise BitbenchError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    counts = count_ops(args.method, args.arch, args.num_classes, args.image_size, args.in_channels, args.variant,
                       per_layer=args.per_layer)
    print(json.dumps(counts, indent=2))
    return 0
