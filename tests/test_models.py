"""Model registry, every method x architecture, paper structure counts, recipes and the KD loss."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from baselines.archs.mobilenet import DuplicatedResidual
from baselines.layers import BinaryConv2d, binary_layers
from baselines.losses import distribution_loss
from baselines.recipe import MethodSpec, Recipe
from benchmark import models
from benchmark.cli import main as cli_main
from benchmark.errors import BitbenchError

BASELINES = ("fp", "xnor", "bireal", "reactnet")
ARCHS = ("resnet20", "resnet18", "resnet34", "mobilenetv1", "mobilenetv2")
# Binary convolutions per architecture in every binary method (stem, classifier and ResNet-18/34's three
# downsample 1x1 convs stay real). Bi-Real-18: 16 (paper); ReActNet-A: 13 3x3 + 13 1x1 + 5 duplicates = 31;
# MobileNetV2: 17 blocks (2 + 16 x 3 convs) + the 320 -> 1280 conv = 51.
BINARY_CONVS = {"resnet20": 18, "resnet18": 16, "resnet34": 32, "mobilenetv1": 31, "mobilenetv2": 51}
REAL_CONVS_AFTER_STEM = {"resnet20": 0, "resnet18": 3, "resnet34": 3, "mobilenetv1": 0, "mobilenetv2": 0}
BLOCKS = {"resnet20": 9, "resnet18": 8, "resnet34": 16, "mobilenetv1": 13, "mobilenetv2": 18}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", BASELINES)
def test_every_method_runs_on_every_arch(method, arch):
    torch.manual_seed(0)
    for in_channels, size in ((1, 28), (3, 32)):
        model = models.create_model(method, arch, num_classes=7, in_channels=in_channels, image_size=size)
        x = torch.randn(2, in_channels, size, size)
        out = model(x)
        assert out.shape == (2, 7) and torch.isfinite(out).all()
        out.logsumexp(dim=1).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing[:5]
        binary = binary_layers(model)
        expected = BINARY_CONVS[arch] if method != "fp" else 0
        assert len(binary) == expected
        assert all(m.binarize_inputs and m.binarize_weights for _, m in binary)
        assert all(m.weight.grad.abs().sum() > 0 for _, m in binary)
        # full-precision stem and classifier, and only the documented real convs elsewhere
        assert type(model.stem[0]) is nn.Conv2d and model.stem[0].in_channels == in_channels
        assert type(model.fc) is nn.Linear
        stem_ids = {id(m) for m in model.stem.modules()}
        real = [m for m in model.modules() if type(m) is nn.Conv2d and id(m) not in stem_ids]
        if method != "fp":
            assert len(real) == REAL_CONVS_AFTER_STEM[arch]
            assert all(m.kernel_size == (1, 1) for m in real)
        assert len(model.blocks) == BLOCKS[arch]
        assert sum(len(binary_layers(b)) for b in model.blocks) == len(binary)  # every binary conv is in a block


@pytest.mark.parametrize("arch, torchvision_name", [("resnet18", "resnet18"), ("mobilenetv2", "mobilenet_v2")])
def test_fp_matches_torchvision_parameter_count_at_imagenet_settings(arch, torchvision_name):
    ours = models.create_model("fp", arch, num_classes=1000, in_channels=3, image_size=224)
    reference = torchvision.models.get_model(torchvision_name, weights=None)
    assert n_params(ours) == n_params(reference)
    assert sorted(p.numel() for p in ours.parameters()) == sorted(p.numel() for p in reference.parameters())


def test_imagenet_and_cifar_stems():
    big = models.create_model("reactnet", "resnet18", num_classes=1000, in_channels=3, image_size=224)
    assert big.stem[0].kernel_size == (7, 7) and big.stem[0].stride == (2, 2)
    assert isinstance(big.stem[-1], nn.MaxPool2d)
    assert len(binary_layers(big)) == 16
    with torch.no_grad():
        assert big.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    small = models.create_model("reactnet", "resnet18", num_classes=10, in_channels=3, image_size=32)
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.stem)
    v2 = models.create_model("fp", "mobilenetv2", num_classes=10, in_channels=3, image_size=32)
    assert v2.stem[0].stride == (1, 1)
    big_v2 = models.create_model("fp", "mobilenetv2", num_classes=10, in_channels=3, image_size=224)
    strides = [[m.stride[0] for m in net.modules() if isinstance(m, nn.Conv2d) and m.groups > 1] for net in (v2, big_v2)]
    assert strides[1] == [1, 2, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]  # torchvision
    assert strides[0] == [1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]  # kuangliu: 24-channel stage stride 1


def test_reactnet_a_duplicates_the_pointwise_conv_when_width_doubles():
    model = models.create_model("reactnet", "mobilenetv1", num_classes=10, in_channels=3, image_size=32)
    doubling = [b for b in model.blocks if isinstance(b[1], DuplicatedResidual)]
    assert len(doubling) == 5
    dup = model.blocks[0][1]  # 32 -> 64
    convs = [m for m in dup.modules() if isinstance(m, BinaryConv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(32, 32, (1, 1))] * 2
    assert convs[0].input_quantizer is convs[1].input_quantizer  # one RSign, as the official block
    out = dup(torch.randn(2, 32, 8, 8))
    assert out.shape == (2, 64, 8, 8)
    # the 3x3 convs are dense (not depthwise) and all 13 are binary
    threes = [m for _, m in binary_layers(model) if m.kernel_size == (3, 3)]
    assert len(threes) == 13 and all(m.groups == 1 for m in threes)


def test_mobilenetv2_binarizes_depthwise_convs():
    model = models.create_model("bireal", "mobilenetv2", num_classes=10, in_channels=3, image_size=32)
    depthwise = [m for _, m in binary_layers(model) if m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_variants_change_the_quantizers():
    k = models.create_model("xnor", "resnet20", num_classes=10, in_channels=3, image_size=32, variant="K")
    no_k = models.create_model("xnor", "resnet20", num_classes=10, in_channels=3, image_size=32)
    assert all(m.activation_scale is not None for _, m in binary_layers(k))
    assert all(m.activation_scale is None for _, m in binary_layers(no_k))
    paper = models.create_model("bireal", "resnet20", num_classes=10, in_channels=3, image_size=32, variant="paper")
    code = models.create_model("bireal", "resnet20", num_classes=10, in_channels=3, image_size=32)
    assert {m.weight_quantizer.grad for _, m in binary_layers(paper)} == {"magnitude_aware"}
    assert {m.weight_quantizer.grad for _, m in binary_layers(code)} == {"clamp"}


def test_styles_accept_other_quantizers_for_new_methods():
    """The hook BiTAT uses: the same backbone and block structure with its own weight quantizer."""
    from baselines.archs import build
    from baselines.quantizers import SignWeight
    from baselines.reactnet import ReActStyle

    model = build("mobilenetv2", ReActStyle(weight_quantizer=SignWeight), num_classes=10, in_channels=3, image_size=32)
    layers = binary_layers(model)
    assert len(layers) == BINARY_CONVS["mobilenetv2"]
    assert all(isinstance(m.weight_quantizer, SignWeight) for _, m in layers)
    assert len({id(m.weight_quantizer) for _, m in layers}) == len(layers)  # one quantizer module per conv
    assert set(model(torch.randn(1, 3, 32, 32)).shape) == {1, 10}
    with pytest.raises(KeyError, match="valid: resnet20"):
        build("vgg", ReActStyle(), 10, 3, 32)


def test_registry_lists_everything():
    names = [m.name for m in models.list_methods()]
    assert names[:4] == list(BASELINES)
    assert tuple(models.ARCHS) == ARCHS
    for spec in models.list_methods():
        assert spec.default_variant in spec.variants
        assert models.get_method(spec.name) is spec


@pytest.mark.parametrize("call, message", [
    (lambda: models.get_method("nope"), "unknown method 'nope' (valid: fp, xnor, bireal, reactnet"),
    (lambda: models.check_arch("vgg"), "(valid: resnet20, resnet18, resnet34, mobilenetv1, mobilenetv2)"),
    (lambda: models.create_model("fp", "vgg", 10, 3, 32), "unknown architecture 'vgg'"),
    (lambda: models.create_model("xnor", "resnet18", 10, 3, 32, variant="bad"), "(valid: noK, K)"),
    (lambda: models.create_model("fp", "resnet18", 0, 3, 32), "num_classes must be a positive integer"),
])
def test_bad_names_raise_one_line_errors(call, message):
    with pytest.raises(BitbenchError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_register_method_and_impossible_combination(monkeypatch):
    models.list_methods()
    monkeypatch.setattr(models, "_methods", dict(models._methods))

    def build(arch, num_classes, in_channels, image_size, variant):
        if arch != "resnet20":
            raise ValueError("toy only has a resnet20 layout")
        return models.create_model("fp", arch, num_classes, in_channels, image_size)

    toy = MethodSpec("toy", "a test method", ("a", "b"), "b", build, lambda family, variant: Recipe(stages=()))
    models.register_method(toy)
    assert models.get_method("toy") is toy
    assert isinstance(models.create_model("toy", "resnet20", 10, 1, 28), nn.Module)
    with pytest.raises(BitbenchError, match="cannot build toy/b on resnet18: toy only has a resnet20 layout"):
        models.create_model("toy", "resnet18", 10, 1, 28)
    with pytest.raises(BitbenchError, match="already registered"):
        models.register_method(dataclasses.replace(toy, description="another"))
    with pytest.raises(BitbenchError, match="default variant"):
        models.register_method(dataclasses.replace(toy, name="toy2", default_variant="c"))


def test_models_cli_table_and_json(capsys):
    assert cli_main(["models"]) == 0
    text = capsys.readouterr().out
    for name in BASELINES + ARCHS:
        assert name in text
    assert "two-step-kd*" in text and "noK*" in text
    assert cli_main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in listing["methods"]][:4] == list(BASELINES)
    assert [a["name"] for a in listing["archs"]] == list(ARCHS)


@pytest.mark.parametrize("method", BASELINES)
def test_every_recipe_is_complete(method):
    spec = models.get_method(method)
    for family in ("mnist", "cifar", "imagenet"):
        for variant in spec.variants:
            recipe = spec.recipe(family, variant)
            assert isinstance(recipe, Recipe) and len(recipe.stages) >= 1
            assert recipe.epochs > 0 and recipe.batch_size > 0 and recipe.source
            assert all(s.optim.lr > 0 and s.loss in ("ce", "kd", "ce+kd") for s in recipe.stages)
            if any(s.loss != "ce" for s in recipe.stages):
                assert recipe.teacher == ("torchvision:resnet34" if family == "imagenet" else "fp")
            json.dumps(recipe.describe())
    with pytest.raises(ValueError, match="mnist, cifar, imagenet"):
        spec.recipe("svhn", spec.default_variant)


def test_reactnet_two_step_hooks_flip_weight_binarization():
    spec = models.get_method("reactnet")
    recipe = spec.recipe("cifar", "two-step-kd")
    step1, step2 = recipe.stages
    assert (step1.optim.weight_decay, step2.optim.weight_decay) == (1e-5, 0.0)
    assert step1.optim.decay_on == step2.optim.decay_on == "conv" and step1.loss == step2.loss == "kd"
    assert recipe.teacher == "fp" and spec.recipe("imagenet", "two-step-kd").teacher == "torchvision:resnet34"
    model = models.create_model("reactnet", "resnet20", num_classes=10, in_channels=3, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    step1.apply(model)
    assert not any(m.binarize_weights for _, m in binary_layers(model))
    assert all(m.binarize_inputs for _, m in binary_layers(model))
    real_out = model(x)
    step2.apply(model)
    assert all(m.binarize_weights for _, m in binary_layers(model))
    assert not torch.allclose(model(x), real_out)
    short = recipe.with_overrides(epochs=2)
    assert [s.epochs for s in short.stages] == [1, 1]
    ce = spec.recipe("cifar", "one-step-ce")
    assert len(ce.stages) == 1 and ce.teacher is None and ce.stages[0].label_smoothing == 0.1


def test_reactnet_as_written_restarts_binary_weights_only():
    recipe = models.get_method("reactnet").recipe("mnist", "two-step-as-written")
    assert recipe.stages[0].calibrate is None and recipe.stages[1].calibrate is not None
    model = models.create_model("reactnet", "mobilenetv1", num_classes=10, in_channels=1, image_size=28)
    stem_before = model.stem[0].weight.detach().clone()
    recipe.stages[1].calibrate(model, iter(()))
    for _, m in binary_layers(model):
        assert 0 <= m.weight.min() and m.weight.max() < 1e-3
    assert torch.equal(model.stem[0].weight, stem_before)


def test_distribution_loss_is_soft_cross_entropy():
    torch.manual_seed(0)
    student = torch.randn(5, 4, requires_grad=True)
    teacher = torch.randn(5, 4, requires_grad=True)
    loss = distribution_loss(student, teacher)
    p = teacher.detach().softmax(dim=1)
    expected = -(p * student.detach().log_softmax(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(loss, expected)
    # equals KL(teacher || student) + teacher entropy, so the student gradient is the KL's
    kl = F.kl_div(student.detach().log_softmax(dim=1), p, reduction="batchmean")
    entropy = -(p * p.log()).sum(dim=1).mean()
    torch.testing.assert_close(loss, kl + entropy)
    loss.backward()
    assert teacher.grad is None
    torch.testing.assert_close(student.grad, (student.detach().softmax(dim=1) - p) / 5)
    with pytest.raises(ValueError, match="differ in shape"):
        distribution_loss(torch.zeros(2, 3), torch.zeros(2, 4))
