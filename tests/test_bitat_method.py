"""BiTAT as a registered method: the fp checkpoint transfers completely into every architecture, the untouched
model computes the fp function, the recipes are complete and hash-stable, and a tiny real run (fp, then bitat
from it, through the training engine) ends in a model that passes the export audit."""
import json

import pytest
import torch

from baselines.layers import RPReLU, RSign, binary_layers
from benchmark.audit import audit_model
from benchmark.checkpoint import load_run_model
from benchmark.errors import BitbenchError
from benchmark.models import ARCHS, create_model, get_method
from benchmark.runs import resolve_config, run_dir_for
from benchmark.train import train
from bitat.method import TRANSFORM_LR_PATTERN
from bitat.quantizer import ImportanceAwareSign

METHODS = ("bitat", "bitat-no-progressive", "bitat-no-transform")
TINY = {"max_batches": 2, "eval_max_batches": 1, "batch_size": 32, "workers": 0, "epochs": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_fp_tensor_transfers_and_the_untouched_model_is_the_fp_model(arch):
    torch.manual_seed(0)
    fp = create_model("fp", arch, num_classes=10, in_channels=1, image_size=28)
    bitat = create_model("bitat", arch, num_classes=10, in_channels=1, image_size=28)
    fp_state, bitat_state = fp.state_dict(), bitat.state_dict()
    assert all(k in bitat_state and bitat_state[k].shape == v.shape for k, v in fp_state.items())
    result = bitat.load_state_dict(fp_state, strict=False)  # what the engine does with init_from='fp'
    assert result.unexpected_keys == []
    new_kinds = (RSign, RPReLU, ImportanceAwareSign)  # only BiTAT/ReActNet's own parts start fresh
    for key in result.missing_keys:
        parts = key.split(".")
        owners = [bitat.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
        assert any(isinstance(m, new_kinds) for m in owners), key
    if arch in ("resnet20", "resnet18", "mobilenetv1"):  # same graph as fp once every layer is real
        for _, layer in binary_layers(bitat):
            layer.binarize_inputs = layer.binarize_weights = False
        fp.eval(), bitat.eval()
        x = torch.randn(2, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(bitat(x), fp(x))


@pytest.mark.parametrize("method", METHODS)
def test_recipes_are_complete_and_hash_stable(method):
    spec = get_method(method)
    for family in ("mnist", "cifar", "imagenet"):
        for variant in spec.variants:
            recipe = spec.recipe(family, variant)
            assert recipe.init_from == "fp" and recipe.epochs > 0 and recipe.source
            assert (recipe.teacher == "fp") == any(s.loss != "ce" for s in recipe.stages)
            text = json.dumps(recipe.describe())
            assert "0x" not in text and text == json.dumps(spec.recipe(family, variant).describe())
            binarizing = [s for s in recipe.stages if s.name != "finetune"]
            assert (len(binarizing) > 1) == (method != "bitat-no-progressive")
            transform = method != "bitat-no-transform"
            # every binarizing stage calibrates its new layers' thresholds; V, s only with the transform
            assert all(s.calibrate is not None and s.calibrate.transform == transform for s in binarizing)
            assert all(dict(s.optim.group_lr).keys() == ({TRANSFORM_LR_PATTERN} if transform else set())
                       for s in binarizing)
    with pytest.raises(ValueError, match="unknown variant"):
        spec.recipe("cifar", "nope")
    model = create_model(method, "resnet20", num_classes=10, in_channels=1, image_size=8)
    names = [n for n, _ in model.named_parameters() if TRANSFORM_LR_PATTERN in n]
    assert bool(names) == (method != "bitat-no-transform")
    assert all(".weight_quantizer.bitat_transform." in n for n in names)  # the group_lr pattern hits only V, s


def test_needs_the_fp_run_first(fmnist_dir, tmp_path):
    cell = {"dataset": "fashion-mnist", "data_dir": str(fmnist_dir), "arch": "resnet20", "method": "bitat",
            "run_dir": str(run_dir_for(tmp_path, "fashion-mnist", "resnet20", "bitat", None, 0)),
            "overrides": dict(TINY)}
    with pytest.raises(BitbenchError, match="bitat needs the finished 'fp' run of fashion-mnist/resnet20"):
        resolve_config(cell)


def test_tiny_run_from_fp_checkpoint_ends_fully_binary_and_passes_the_audit(fmnist_dir, tmp_path, capsys):
    def cell(method):
        return {"dataset": "fashion-mnist", "data_dir": str(fmnist_dir), "arch": "resnet20", "method": method,
                "seed": 0, "run_dir": str(run_dir_for(tmp_path, "fashion-mnist", "resnet20", method, None, 0)),
                "overrides": dict(TINY)}

    train(resolve_config(cell("fp")))
    cfg = resolve_config(cell("bitat"))
    assert cfg["init_run"].endswith("fp/seed0") and cfg["recipe"]["init_from"] == "fp"
    metrics = train(cfg)
    assert " new, 0 unused tensors" in capsys.readouterr().err  # every fp tensor was loaded
    recipe = get_method("bitat").recipe("mnist", "layerwise")
    assert metrics["epochs"] == len(recipe.stages)  # each stage is at least one (short) epoch
    history = json.loads((tmp_path / "fashion-mnist" / "resnet20" / "bitat" / "seed0" / "metrics.json").read_text())
    assert history["best_val_epoch"] == metrics["epochs"]  # best chosen in the final stage

    model, run_cfg = load_run_model(cfg["run_dir"])
    layers = binary_layers(model)
    assert len(layers) == 18 and all(l.binarize_inputs and l.binarize_weights for _, l in layers)
    # the transform was calibrated (V moved off the identity) and its α is the binary layer's scale
    v = layers[0][1].weight_quantizer.bitat_transform.basis_matrix().detach()
    assert not torch.allclose(v, torch.eye(v.shape[-1]).expand_as(v))
    spec = {k: run_cfg[k] for k in ("method", "arch", "num_classes", "in_channels", "image_size", "variant")}
    report = audit_model(model, (1, 28, 28), spec=spec)
    assert report["passed"], report["problems"]
    assert report["binary_layers"] == 18 and report["not_binary"] == {}
    assert report["max_abs_logit_diff"] < 1e-4
