"""BiTAT's progressive schedule: segments go bottom to top and cover every layer; running the recipe's stage hooks
with a few optimizer steps freezes each binarized layer for good while the layers above keep training; the
calibration initialises only the layers that become current (RSign thresholds, and V, s with the transform);
hooks are idempotent (resume)."""
import pytest
import torch
import torch.nn.functional as F

from baselines.layers import binary_layers
from benchmark.models import create_model, get_method
from benchmark.optim import build_optimizer
from bitat.schedule import Calibrate, SetModes, segment, set_threshold, units


pytestmark = pytest.mark.usefixtures("one_thread")


def batches(n=3, size=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, size, size, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(n)]


@pytest.mark.parametrize("steps, n_units", [(8, 18), (4, 4), (16, 9), (3, 10), (1, 5)])
def test_segments_go_bottom_to_top_and_cover_every_unit(steps, n_units):
    segs = [segment(k, steps, n_units) for k in range(steps)]
    assert all(len(s) >= 1 for s in segs)
    assert segs[0].start == 0 and segs[-1].stop == n_units
    visited = [u for s in segs for u in s]
    assert sorted(set(visited)) == list(range(n_units))
    assert visited == sorted(visited), "never goes back down"
    if n_units >= steps:
        assert visited == list(range(n_units)), "each unit is current in exactly one stage"
    with pytest.raises(ValueError):
        segment(steps, steps, n_units)


def test_progressive_recipe_freezes_layers_bottom_to_top_while_layers_above_train():
    torch.manual_seed(0)
    model = create_model("bitat", "resnet20", num_classes=10, in_channels=1, image_size=8)
    recipe = get_method("bitat").recipe("mnist", "layerwise")
    layers = [layer for _, layer in binary_layers(model)]
    data = batches()
    frozen_at: dict[int, torch.Tensor] = {}
    current_per_stage = []
    for stage in recipe.stages:
        stage.apply(model)
        roles = dict((id(layer), role) for layer, role in stage.apply.roles(model))
        if stage.calibrate is not None:
            stage.calibrate(model, iter(data[:2]))
        current = [i for i, layer in enumerate(layers) if roles[id(layer)] == "current"]
        current_per_stage.append(current)
        for i, layer in enumerate(layers):  # the modes the stage promises
            role = roles[id(layer)]
            assert layer.binarize_weights == layer.binarize_inputs == (role != "fp")
            assert layer.weight.requires_grad == (role != "frozen")
            assert all(p.requires_grad == (role == "current")
                       for p in layer.weight_quantizer.bitat_transform.parameters())
        before = {i: layer.weight.detach().clone() for i, layer in enumerate(layers)}
        optimizer = build_optimizer(model, stage.optim)
        model.train()
        for images, labels in data[:2]:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not unused, f"{stage.name}: trainable but unused (DDP would stall): {unused[:3]}"
            optimizer.step()
        for i, layer in enumerate(layers):
            role = roles[id(layer)]
            if role == "frozen":
                assert torch.equal(layer.weight.detach(), frozen_at[i]), f"{stage.name}: frozen layer {i} moved"
            else:
                assert not torch.equal(layer.weight.detach(), before[i]), f"{stage.name}: layer {i} ({role}) idle"
            if role == "current":
                frozen_at[i] = layer.weight.detach().clone()
    progressive, final = current_per_stage[:-1], current_per_stage[-1]
    assert [i for seg in progressive for i in seg] == list(range(len(layers))), "every layer once, bottom to top"
    assert final == [] and all(not layer.weight.requires_grad for layer in layers)
    assert all(layer.binarize_weights and layer.binarize_inputs for layer in layers)


def test_calibration_initialises_only_the_new_layers_from_their_binarized_inputs():
    torch.manual_seed(0)
    model = create_model("bitat", "resnet20", num_classes=10, in_channels=1, image_size=8)
    layers = [layer for _, layer in binary_layers(model)]
    eye_v = {id(layer): torch.allclose(layer.weight_quantizer.bitat_transform.basis_matrix().detach(),
                                       torch.eye(layer.weight_quantizer.bitat_transform.n)) for layer in layers}
    assert all(eye_v.values()), "V starts as the identity"
    modes = SetModes(1, 9, "layer")  # 18 layers in 9 stages: layers 2, 3 are current
    modes(model)
    bn = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    Calibrate(modes, rows_per_batch=256)(model, iter(batches(2)))
    for i, layer in enumerate(layers):
        v = layer.weight_quantizer.bitat_transform.basis_matrix().detach()
        assert torch.allclose(v, torch.eye(v.shape[-1])) == (i not in (2, 3)), i
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in bn.items()), "calibration left BN statistics"
    # the statistic is that of the binarized input: ±1 (and zero padding), so its diagonal is at most 1
    sigma = layers[2].weight_quantizer.bitat_transform
    assert sigma.importance().detach().max() > 1.5, "PCA found dominant directions in the binary input"


@pytest.mark.parametrize("method", ["bitat", "bitat-no-transform"])
def test_calibration_puts_new_thresholds_at_the_channel_mean_of_their_relu_inputs(method):
    torch.manual_seed(0)
    model = create_model(method, "resnet20", num_classes=10, in_channels=1, image_size=8)
    layers = [layer for _, layer in binary_layers(model)]
    modes = SetModes(1, 9, "layer")  # layers 2, 3 become current; 0, 1 binary below, the rest real
    modes(model)
    seen = {}
    hooks = [layers[i].register_forward_pre_hook(lambda m, inp, i=i: seen.setdefault(i, inp[0].clone()))
             for i in (2, 3)]
    data = batches(2)
    Calibrate(modes, rows_per_batch=256, transform=method == "bitat")(model, iter(data))
    for h in hooks:
        h.remove()
    for i, layer in enumerate(layers):
        shift = layer.input_quantizer.shift.bias.detach().flatten()
        if i in (2, 3):  # the first calibration batch's input, as the conv received it
            assert (seen[i] >= 0).all(), "the fp layout feeds binary convs ReLU outputs"
            torch.testing.assert_close(shift, -seen[i].mean(dim=(0, 2, 3)))
            binary = layer.input_quantizer(seen[i])
            assert (binary == -1).any() and (binary == 1).any(), "sign(x + 0) of a ReLU output would be all +1"
        else:
            assert torch.count_nonzero(shift) == 0, i
    if method == "bitat-no-transform":
        assert all(not hasattr(layer.weight_quantizer, "bitat_transform") for layer in layers)


def test_set_threshold_moves_the_sign_boundary():
    model = create_model("bitat", "resnet20", num_classes=10, in_channels=1, image_size=8)
    rsign = binary_layers(model)[0][1].input_quantizer
    set_threshold(rsign, torch.full((16,), 0.5))
    x = torch.tensor([0.0, 0.49, 0.5, 2.0]).view(4, 1, 1, 1).expand(4, 16, 1, 1)
    assert rsign(x)[:, 0].flatten().tolist() == [-1.0, -1.0, 1.0, 1.0]


def test_apply_hooks_are_idempotent_as_resume_needs():
    recipe = get_method("bitat").recipe("mnist", "layerwise")
    sequential = create_model("bitat", "resnet20", num_classes=10, in_channels=1, image_size=8)
    for stage in recipe.stages[:4]:
        stage.apply(sequential)
    fresh = create_model("bitat", "resnet20", num_classes=10, in_channels=1, image_size=8)
    recipe.stages[3].apply(fresh)
    recipe.stages[3].apply(fresh)
    state = lambda m: [(l.binarize_inputs, l.binarize_weights, l.weight.requires_grad,  # noqa: E731
                        tuple(p.requires_grad for p in l.parameters())) for _, l in binary_layers(m)]
    assert state(sequential) == state(fresh)


def test_blockwise_units_and_trainable_block_transforms():
    model = create_model("bitat", "mobilenetv2", num_classes=10, in_channels=1, image_size=8, variant="figure")
    blocks = units(model, "block")
    assert len(blocks) == len(model.blocks) and sum(len(b) for b in blocks) == len(binary_layers(model))
    assert [len(b) for b in blocks[:3]] == [2, 3, 3]  # MobileNetV2: t=1 block has no expansion conv
    modes = get_method("bitat").recipe("mnist", "figure").stages[1].apply
    modes(model)
    roles = modes.roles(model)
    first_current = next(i for i, (_, r) in enumerate(roles) if r == "current")
    lower_in_block = roles[first_current - 1][0]
    assert roles[first_current - 1][1] == "frozen" and not lower_in_block.weight.requires_grad
    same_block = any(lower_in_block in b and roles[first_current][0] in b for b in blocks)
    transform_trains = all(p.requires_grad for p in lower_in_block.weight_quantizer.bitat_transform.parameters())
    assert transform_trains == same_block
    blockwise = get_method("bitat").recipe("mnist", "blockwise").stages[0].apply
    blockwise(model)
    current = [layer for layer, role in blockwise.roles(model) if role == "current"]
    first_blocks = [layer for b in blocks[:len(segment(0, blockwise.steps, len(blocks)))] for layer in b]
    assert current == first_blocks, "whole blocks, the bottom ones first"
