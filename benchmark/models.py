"""The model registry: methods (`MethodSpec`s) and architectures by name, and the `bitbench models` listing.

Methods come from the `METHODS` tuple of each package in `METHOD_PACKAGES` (baselines, then bitat once it
defines one), plus anything passed to `register_method`. Bad names raise BitbenchError naming the choices.
"""
from __future__ import annotations

import argparse
import importlib
import json

from torch import nn

from baselines.archs import ARCHS as _ARCH_BUILDERS
from baselines.recipe import MethodSpec
from benchmark.errors import BitbenchError

METHOD_PACKAGES = ("baselines", "bitat")
ARCHS: dict[str, str] = {name: description for name, (_, description) in _ARCH_BUILDERS.items()}
FAMILIES = ("mnist", "cifar", "imagenet")

_methods: dict[str, MethodSpec] = {}
_loaded = False


def register_method(spec: MethodSpec, replace: bool = False) -> MethodSpec:
    """Add a method to the registry (a package may instead list it in its `METHODS` tuple)."""
    if not isinstance(spec, MethodSpec):
        raise BitbenchError(f"register_method needs a baselines.recipe.MethodSpec, got {type(spec).__name__}")
    if spec.default_variant not in spec.variants:
        raise BitbenchError(f"method {spec.name!r}: default variant {spec.default_variant!r} is not one of "
                            f"its variants ({', '.join(spec.variants)})")
    if spec.name in _methods and _methods[spec.name] is not spec and not replace:
        raise BitbenchError(f"method {spec.name!r} is already registered")
    _methods[spec.name] = spec
    return spec


def _load_packages() -> None:
    global _loaded
    if _loaded:
        return
    for package in METHOD_PACKAGES:
        module = importlib.import_module(package)
        for spec in getattr(module, "METHODS", ()):
            if _methods.get(spec.name) is not spec:
                register_method(spec)
    _loaded = True


def list_methods() -> list[MethodSpec]:
    """Every registered method, in registration order (baselines first)."""
    _load_packages()
    return list(_methods.values())


def get_method(name: str) -> MethodSpec:
    """The method called `name`; BitbenchError listing the valid ones otherwise."""
    _load_packages()
    if name not in _methods:
        raise BitbenchError(f"unknown method {name!r} (valid: {', '.join(_methods)})")
    return _methods[name]


def check_arch(name: str) -> None:
    """BitbenchError listing the valid architectures unless `name` is one."""
    if name not in ARCHS:
        raise BitbenchError(f"unknown architecture {name!r} (valid: {', '.join(ARCHS)})")


def check_variant(spec: MethodSpec, variant: str | None) -> str:
    """The variant to use (the method's default for None); BitbenchError listing the valid ones otherwise."""
    variant = variant or spec.default_variant
    if variant not in spec.variants:
        raise BitbenchError(f"unknown variant {variant!r} of method {spec.name!r} (valid: {', '.join(spec.variants)})")
    return variant


def create_model(method: str, arch: str, num_classes: int, in_channels: int, image_size: int,
                 variant: str | None = None) -> nn.Module:
    """A freshly initialised `arch` trained by `method` (its `variant`, default if None)."""
    spec = get_method(method)
    check_arch(arch)
    variant = check_variant(spec, variant)
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BitbenchError(f"{name} must be a positive integer, got {value!r}")
    try:
        return spec.build(arch, num_classes, in_channels, image_size, variant)
    except (ValueError, KeyError) as err:
        message = err.args[0] if err.args else str(err)
        raise BitbenchError(f"cannot build {method}/{variant} on {arch}: {message}") from err


def describe() -> dict:
    """Methods (variants, default, binary, description) and architectures as a JSON-able dict."""
    return {
        "methods": [{"name": s.name, "binary": s.binary, "variants": list(s.variants),
                     "default_variant": s.default_variant, "description": s.description}
                    for s in list_methods()],
        "archs": [{"name": name, "description": description} for name, description in ARCHS.items()],
    }


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the listing as JSON")


def run(args: argparse.Namespace) -> int:
    info = describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    methods = [["METHOD", "BINARY", "VARIANTS (* = default)", "DESCRIPTION"]]
    for m in info["methods"]:
        variants = ", ".join(v + ("*" if v == m["default_variant"] else "") for v in m["variants"])
        methods.append([m["name"], "yes" if m["binary"] else "no", variants, m["description"]])
    archs = [["ARCH", "DESCRIPTION"]] + [[a["name"], a["description"]] for a in info["archs"]]
    print(_table(methods))
    print()
    print(_table(archs))
    return 0
