"""The binary-export audit: every method x architecture exports to packed bits and rebuilds to the same logits;
false binary claims, corrupted exports and broken runs are caught; the CLI on fresh models and finished runs."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from baselines.layers import BinaryConv2d, binary_layers, set_binarize_inputs, set_binarize_weights
from baselines.quantizers import ScaledSignWeight, SteSign
from benchmark.audit import audit_model, prime_batchnorm, random_inputs
from benchmark.cli import main
from benchmark.errors import BitbenchError
from benchmark.export import export_binary, load_export, pack_signs, rebuild, unpack_signs
from benchmark.models import ARCHS, create_model, list_methods

SHAPE = (3, 16, 16)
BASELINES = ("fp", "xnor", "bireal", "reactnet")


def fresh(method: str, arch: str, variant: str | None = None, image_size: int = 16) -> tuple[nn.Module, dict]:
    spec = {"method": method, "arch": arch, "num_classes": 10, "in_channels": 3, "image_size": image_size,
            "variant": variant}
    torch.manual_seed(0)
    return prime_batchnorm(create_model(**spec), (3, image_size, image_size), steps=1, batch_size=4), spec


pytestmark = pytest.mark.usefixtures("one_thread")


def deployed_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters an inference model keeps: all but those of binary layers' weight quantizers (training-only
    state such as BiTAT's V and s)."""
    quantizers = tuple(f"{n}.weight_quantizer." for n, m in binary_layers(model) if m.binarize_weights)
    return {n: p for n, p in model.named_parameters() if not n.startswith(quantizers)}


def expected_packed_bytes(model: nn.Module) -> int:
    """1 bit per binary weight (rounded up per layer), a 4-byte scale per output channel, 4 bytes per other parameter."""
    binary = {f"{n}.weight" for n, m in binary_layers(model) if m.binarize_weights}
    return sum(math.ceil(p.numel() / 8) + 4 * p.shape[0] if n in binary else 4 * p.numel()
               for n, p in deployed_parameters(model).items())


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("method", [m.name for m in list_methods()])
def test_every_method_and_arch_rebuilds_from_packed_bits(method, arch):
    model, spec = fresh(method, arch)
    report = audit_model(model, SHAPE, spec=spec, batch_size=4)
    assert report["passed"], report["problems"]
    assert report["max_abs_logit_diff"] < 1e-4
    layers = binary_layers(model)
    binarized = [n for n, m in layers if m.binarize_inputs and m.binarize_weights]
    assert report["binary_layers"] == len(binarized) and report["binary_layer_names"] == binarized
    if method in BASELINES:  # every BinaryConv2d of a baseline is binary as built; fp has none
        assert report["binary_layers"] == len(layers) and (len(layers) == 0) == (method == "fp")
    assert report["packed_bytes"] == expected_packed_bytes(model)
    assert report["fp32_bytes"] == 4 * sum(p.numel() for p in deployed_parameters(model).values())
    convs_and_linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(report["fp_layers"] + report["binary_layer_names"] + report["binary_weight_only_layers"]) == \
        sorted(convs_and_linears)
    assert "stem.0" in report["fp_layers"] and "fc" in report["fp_layers"]


def test_rebuilt_model_holds_no_latent_weight():
    model, spec = fresh("bireal", "resnet20")
    export = export_binary(model, spec)
    for name in export["binary"]:
        assert f"{name}.weight" not in export["float"]
        assert not any(k.startswith(f"{name}.weight_quantizer") for k in export["float"])
    rebuilt = rebuild(export)
    original = dict(binary_layers(model))
    for name, layer in binary_layers(rebuilt):
        w = layer.weight.detach()
        a = w.abs().flatten(1)
        assert torch.equal(a, a[:, :1].expand_as(a))  # exactly scale·(±1)
        assert not torch.equal(w, original[name].weight.detach())  # not the latent weight
        assert torch.equal(w, original[name].quantized_weight().detach())
    x = random_inputs(SHAPE, 4)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


@pytest.mark.parametrize("method,variant", [("xnor", "K"), ("reactnet", "two-step-as-written")])
def test_variants_pass(method, variant):
    model, spec = fresh(method, "resnet20", variant)
    report = audit_model(model, SHAPE, spec=spec, batch_size=4)
    assert report["passed"] and report["binary_layers"] == len(binary_layers(model))


def test_reactnet_step_one_layers_are_reported_full_precision():
    model, spec = fresh("reactnet", "resnet20")
    set_binarize_weights(model, False)
    report = audit_model(model, SHAPE, spec=spec, batch_size=4)
    assert report["passed"] and report["binary_layers"] == 0 and report["bits_bytes"] == 0
    names = [n for n, _ in binary_layers(model)]
    assert set(names) <= set(report["fp_layers"])
    assert report["packed_bytes"] == report["fp32_bytes"]


def test_binary_weights_with_real_inputs_are_packed_but_not_counted_binary():
    model, spec = fresh("xnor", "resnet20")
    set_binarize_inputs(model, False)
    report = audit_model(model, SHAPE, spec=spec, batch_size=4)
    assert report["passed"] and report["binary_layers"] == 0
    assert len(report["binary_weight_only_layers"]) == len(binary_layers(model)) and report["bits_bytes"] > 0


class NotReallyBinary(nn.Module):
    """A 'binary' conv whose weight quantizer passes the latent weight through: |w| varies within channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.honest = BinaryConv2d(8, 8, 3, padding=1, input_quantizer=SteSign(), weight_quantizer=ScaledSignWeight())
        self.claims_binary = BinaryConv2d(8, 8, 3, padding=1, input_quantizer=SteSign(), weight_quantizer=nn.Identity())
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.bn(self.claims_binary(self.honest(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


def test_non_uniform_magnitudes_are_reported_not_binary():
    torch.manual_seed(0)
    model = prime_batchnorm(NotReallyBinary(), (3, 8, 8))
    report = audit_model(model, (3, 8, 8), batch_size=4)
    assert not report["passed"]
    assert list(report["not_binary"]) == ["claims_binary"] and report["binary_layer_names"] == ["honest"]
    assert "claims_binary" in report["fp_layers"]
    assert any("claims_binary" in p and "not binary" in p for p in report["problems"])
    assert report["max_abs_logit_diff"] < 1e-4  # the rebuild still reproduces it: only the claim is false


def test_corrupted_export_is_caught():
    model, spec = fresh("reactnet", "resnet20")
    export = export_binary(model, spec)
    x = random_inputs(SHAPE, 4)
    with torch.no_grad():
        reference = model(x)
    name = next(iter(export["binary"]))
    flipped = {**export, "binary": {**export["binary"], name: {**export["binary"][name],
                                                                  "bits": export["binary"][name]["bits"] ^ 0xFF}}}
    with torch.no_grad():
        assert (rebuild(flipped)(x) - reference).abs().max() > 1e-4
    missing = {**export, "float": {k: v for k, v in export["float"].items() if not k.endswith("running_var")}}
    with pytest.raises(BitbenchError, match="running_var"):
        rebuild(missing)
    with pytest.raises(BitbenchError, match="build"):
        rebuild({**export, "model": None})


def test_pack_unpack_round_trip_and_sign_of_zero():
    w = torch.tensor([[0.5, -0.5, 0.0], [-2.0, 2.0, -0.0]]).repeat(1, 5)  # 30 elements: not a multiple of 8
    packed = pack_signs(w)
    assert packed.dtype == torch.uint8 and packed.numel() == 4
    assert torch.equal(unpack_signs(packed, w.shape), torch.where(w >= 0, 1.0, -1.0))
    with pytest.raises(BitbenchError, match="shape"):
        unpack_signs(packed, (5, 7))


def test_cli_fresh_model_writes_export(tmp_path, capsys):
    out = tmp_path / "export.pt"
    rc = main(["audit", "--method", "xnor", "--arch", "resnet20", "--num-classes", "10", "--image-size", "32",
               "--batch-size", "4", "--out", str(out)])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["passed"] and report["export"] == str(out)
    assert report["binary_layers"] == 18 and report["export_file_bytes"] == out.stat().st_size
    export = load_export(out)
    assert all(e["bits"].dtype == torch.uint8 for e in export["binary"].values())
    assert not list(tmp_path.glob(".export.pt*"))  # nothing half-written left behind
    assert main(["audit", "--arch", "resnet20"]) == 2
    assert "--method" in capsys.readouterr().err


def test_cli_on_a_finished_run(fmnist_dir, tmp_path, capsys):
    """A real tiny ReActNet two-step run (CE, no teacher): the audit loads it in its final (binary-weight) mode
    and compares logits on the run's val split."""
    from benchmark.runs import resolve_config
    from benchmark.train import train

    run = tmp_path / "runs" / "fashion-mnist" / "resnet20" / "reactnet-two-step-ce" / "seed0"
    train(resolve_config({"dataset": "fashion-mnist", "data_dir": str(fmnist_dir), "arch": "resnet20",
                          "method": "reactnet", "variant": "two-step-ce", "seed": 0, "run_dir": str(run),
                          "overrides": {"epochs": 2, "max_batches": 2, "eval_max_batches": 1, "batch_size": 32,
                                        "workers": 0}}))
    assert main(["audit", "--run", str(run), "--batch-size", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["inputs"] == "val split" and report["batch"] == [8, 1, 28, 28]
    assert report["binary_layers"] == 18 and (run / "export.pt").is_file()
    # a broken checkpoint (NaN BN statistics) fails the audit with a clear message and exit code 2
    state = torch.load(run / "model.pt", weights_only=True)
    key = next(k for k in state if k.endswith("running_var"))
    state[key] = torch.full_like(state[key], float("nan"))
    torch.save(state, run / "model.pt")
    assert main(["audit", "--run", str(run), "--out", str(tmp_path / "broken.pt")]) == 2
    err = capsys.readouterr().err
    assert "audit failed" in err and "not finite" in err and len(err.strip().splitlines()) == 1
