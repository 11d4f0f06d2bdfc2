"""bitbench perf step / data / pipeline, and the fast paths of the binarization primitives against the plain
compositions they replace (same values and gradients, bit for bit). No timed assertions: the speed targets
are checked by the perf commands themselves (docs/performance.md)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baselines.archs.common import AvgPool, Residual, TileChannels
from baselines.layers import RPReLU, RSign, binary_layers
from baselines.quantizers import ScaledSignWeight, SignWeight, channel_scale, ste_sign
from benchmark.cli import main
from benchmark.models import list_methods
from benchmark.perf import step

REPO = Path(__file__).resolve().parents[1]


def bitbench(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmark", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------- bitbench perf step

def test_perf_step_json_has_a_row_per_method_with_ratios_to_fp():
    result = bitbench("perf", "step", "--arch", "resnet20", "--batch-size", "8", "--reps", "2", "--warmup", "1",
                      "--threads", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == [s.name for s in list_methods()]  # every registered method, fp first
    assert report["rows"][0]["method"] == "fp" and rows["fp"]["step_vs_fp"] == 1.0 and rows["fp"]["eval_vs_fp"] == 1.0
    for r in report["rows"]:
        assert r["step_ms"] > 0 and r["eval_ms"] > 0 and r["step_images_per_s"] > 0
        assert r["step_vs_fp"] == pytest.approx(r["step_ms"] / rows["fp"]["step_ms"])
        assert r["peak_step_mib"] is None or r["peak_step_mib"] >= 0
    assert rows["reactnet"]["stage"] == "step2"  # binary weights and activations
    if "bitat" in rows:  # a middle progressive stage, not the final fine-tune
        assert rows["bitat"]["stage"].startswith("binarize-")
    assert report["threads"] == 1 and report["batch_size"] == 8 and report["arch"] == "resnet20"
    assert report["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")  # set before torch loads


def test_perf_step_table_and_method_selection_adds_fp():
    result = bitbench("perf", "step", "--methods", "xnor:K", "--batch-size", "4", "--reps", "1", "--warmup", "0",
                      "--image-size", "32", "--in-channels", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["METHOD", "VARIANT", "STAGE"]
    assert [line.split()[:2] for line in lines[2:]] == [["fp", "default"], ["xnor", "K"]]


def test_perf_step_runs_the_gpu_checks_benchmark_shape_under_autocast():
    """What scripts/gpu-check.sh runs on a GPU (resnet18, 3x224x224, 1000 classes, bf16 autocast, every method),
    here on the CPU at batch 2: every method trains and evaluates in mixed precision at that shape."""
    result = bitbench("perf", "step", "--arch", "resnet18", "--image-size", "224", "--in-channels", "3",
                      "--num-classes", "1000", "--batch-size", "2", "--amp", "--reps", "1", "--warmup", "0",
                      "--threads", "1", "--json", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["amp"] is True and report["image_size"] == 224 and report["num_classes"] == 1000
    assert [r["method"] for r in report["rows"]] == [s.name for s in list_methods()]
    assert all(r["step_ms"] > 0 and r["eval_ms"] > 0 for r in report["rows"])


def test_gpu_check_without_cuda_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the check would run for real")
    env = {**os.environ, "BITBENCH_VENV": sys.prefix}
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), str(tmp_path / "out")], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("gpu-check: no CUDA device")
    assert not (tmp_path / "out").exists()  # failed before any work


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet99"], "unknown architecture 'resnet99'"),
    (["--methods", "nonesuch"], "unknown method 'nonesuch'"),
    (["--methods", "xnor:bogus"], "unknown variant 'bogus'"),
    (["--batch-size", "0"], "batch size must be >= 1"),
])
def test_perf_step_bad_input_is_one_line_error(args, message, capsys):
    assert main(["perf", "step", *args, "--reps", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_measured_stage_follows_the_recipes():
    from benchmark.runs import resolve_recipe

    cpu = torch.device("cpu")
    assert step.build_subject("fp", None, "resnet20", 10, 1, 28, "fashion-mnist", cpu).stage == "train"
    react = step.build_subject("reactnet", None, "resnet20", 10, 1, 28, "fashion-mnist", cpu)
    assert react.stage == "step2"
    assert all(layer.binarize_weights for _, layer in binary_layers(react.model))
    if "bitat" in [s.name for s in list_methods()]:
        recipe = resolve_recipe("bitat", None, "fashion-mnist", {})
        progressive = [s.name for s in recipe.stages if s.name.startswith("binarize-")]
        bitat = step.build_subject("bitat", None, "resnet20", 10, 1, 28, "fashion-mnist", cpu)
        assert bitat.stage == progressive[len(progressive) // 2]


def test_peak_memory_sees_a_large_temporary():
    cpu = torch.device("cpu")
    peak = step.peak_bytes(lambda: torch.ones(64, 2**20).sum(), cpu)  # a 256 MiB temporary
    if peak is not None:  # Linux only
        assert 200 * 2**20 < peak < 400 * 2**20


# ---------------------------------------------------------------- bitbench perf data

def test_perf_data_compares_the_reader_with_the_fastest_training_step(fmnist_dir):
    result = bitbench("perf", "data", "--data", str(fmnist_dir), "--batch-size", "32", "--batches", "3",
                      "--workers", "0", "--step-methods", "fp", "xnor", "--step-reps", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    fastest = report["fastest_training_step"]
    assert fastest["method"] in ("fp", "xnor") and fastest["arch"] == "resnet20" and fastest["methods_timed"] == 2
    assert fastest["images_per_s"] == pytest.approx(32 / (fastest["step_ms"] / 1e3))
    assert report["vs_fastest_training_step"] == pytest.approx(report["shard_reader"]["images_per_s"]
                                                               / fastest["images_per_s"])


# ---------------------------------------------------------------- bitbench perf pipeline

def test_perf_pipeline_rejects_bad_params_files(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    assert main(["perf", "pipeline", "--params", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "p.yaml").write_text("data_root: data\n")
    assert main(["perf", "pipeline", "--params", str(tmp_path / "p.yaml")]) == 2
    assert "has no `grid:` section" in capsys.readouterr().err
    assert main(["perf", "pipeline", "--project", str(tmp_path)]) == 2
    assert "is not a git checkout" in capsys.readouterr().err
    assert not any((tmp_path / "scratch").iterdir())  # nothing left behind


def test_pipeline_copy_holds_the_tracked_files_and_the_given_params(tmp_path):
    from benchmark.perf import pipeline

    params = tmp_path / "small.yaml"
    params.write_text("grid: {datasets: [fashion-mnist]}\n")
    dest = tmp_path / "copy"
    dest.mkdir()
    pipeline.copy_project(REPO, dest, params)
    assert (dest / "dvc.yaml").read_text() == (REPO / "dvc.yaml").read_text()
    assert (dest / "params.yaml").read_text() == params.read_text()
    assert (dest / ".git").is_dir() and not (dest / "data").exists()
    status = subprocess.run(["git", "-C", str(dest), "status", "--porcelain"], capture_output=True, text=True)
    assert status.stdout == ""  # committed, as a fresh clone
    env = pipeline.tool_env(dest)
    assert env["PYTHONPATH"].split(":")[0] == str(dest)


# ---------------------------------------------------------------- fast primitives == plain compositions

def reference_sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class ReferenceApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return reference_sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (2.0 - 2.0 * x.abs()).clamp(min=0.0)


def grads(out: torch.Tensor, upstream: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, tensors, upstream))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_rsign_equals_shift_then_approx_sign(dtype, monkeypatch):
    monkeypatch.setenv("BITBENCH_FUSED", "0")  # the eager path; the C++ kernels: tests/test_fused.py
    torch.manual_seed(0)
    rs = RSign(6).to(dtype)
    with torch.no_grad():
        rs.shift.bias.normal_()
    x = torch.randn(3, 6, 5, 5, dtype=dtype)
    x[0, :, 0, 0] = -rs.shift.bias.detach().view(-1)  # x + b exactly 0: sign +1
    x[1, :, 0, 0] = 1.0 - rs.shift.bias.detach().view(-1)  # near |x + b| = 1
    x.requires_grad_(True)
    g = torch.randn(3, 6, 5, 5, dtype=dtype)
    fused = rs(x)
    plain = ReferenceApproxSign.apply(x + rs.shift.bias)
    assert torch.equal(fused, plain) and fused.dtype == plain.dtype
    for a, b in zip(grads(fused, g, x, rs.shift.bias), grads(plain, g, x, rs.shift.bias)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_rprelu_equals_its_three_modules(dtype, monkeypatch):
    monkeypatch.setenv("BITBENCH_FUSED", "0")  # the eager path; the C++ kernels: tests/test_fused.py
    torch.manual_seed(1)
    act = RPReLU(5).to(dtype)
    with torch.no_grad():
        act.shift_in.bias.normal_()
        act.shift_out.bias.normal_()
        act.prelu.weight.uniform_(-0.5, 1.5)
    x = torch.randn(2, 5, 6, 6, dtype=dtype)
    x[0, :, 0, 0] = -act.shift_in.bias.detach().view(-1)  # t = 0 exactly
    x.requires_grad_(True)
    g = torch.randn(2, 5, 6, 6, dtype=dtype)
    params = list(act.parameters())
    fused = act(x)
    plain = act.shift_out(act.prelu(act.shift_in(x)))
    assert torch.equal(fused, plain)
    for a, b in zip(grads(fused, g, x, *params), grads(plain, g, x, *params)):
        assert torch.equal(a, b)


def test_sign_and_ste_fast_paths_match_where_on_awkward_values():
    from baselines.quantizers import sign, ste_grad

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        eps = torch.finfo(dtype).eps
        x = torch.tensor([-2.0, -1 - eps, -1.0, -0.5, -0.0, 0.0, 1e-30, 1.0, 1 + eps, 3.0], dtype=dtype)
        g = torch.arange(1.0, 11.0, dtype=dtype)
        assert torch.equal(sign(x), reference_sign(x))
        assert torch.equal(ste_grad(x, g), torch.where(x.abs() <= 1, g, 0.0))


def test_scaled_sign_estimators_equal_their_compositions():
    torch.manual_seed(2)
    w = (torch.randn(4, 3, 3, 3, dtype=torch.float64) * 0.8).requires_grad_(True)
    g = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    inside = (w.detach().abs() <= 1).double()
    alpha = channel_scale(w.detach())
    reference = channel_scale(w) * ste_sign(w)  # xnor_exact: autograd through alpha and the clipped STE
    fused = ScaledSignWeight("xnor_exact")(w)
    assert torch.equal(fused, reference)
    torch.testing.assert_close(grads(fused, g, w)[0], grads(reference, g, w)[0], rtol=0, atol=1e-14)
    assert torch.equal(grads(ScaledSignWeight("clamp")(w), g, w)[0], g * inside)
    torch.testing.assert_close(grads(ScaledSignWeight("magnitude_aware")(w), g, w)[0], g * alpha * inside,
                               rtol=0, atol=0)


def test_weight_quantizer_cache_only_while_no_gradient_can_flow():
    conv_w = nn.Parameter(torch.randn(4, 3, 3, 3))
    for q in (ScaledSignWeight("clamp"), SignWeight()):
        train_out = q(conv_w)
        assert train_out.requires_grad and q._cache is None
        with torch.no_grad():
            first = q(conv_w)
            assert q(conv_w) is first  # cached
            conv_w.mul_(-1)  # an optimizer step / load_state_dict changes the weight in place
            second = q(conv_w)
        assert second is not first and torch.equal(second, -first)
        assert q(conv_w).requires_grad  # back in training: computed with its graph again


def test_fast_avg_pool_and_tiled_shortcut_equal_the_plain_ops():
    torch.manual_seed(3)
    for shape in [(2, 4, 8, 8), (2, 3, 7, 7), (1, 2, 6, 5)]:
        x = torch.randn(*shape, requires_grad=True)
        fast = AvgPool(2)(x)
        plain = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
        g = torch.randn_like(plain)
        assert torch.equal(fast, plain)
        assert torch.equal(grads(fast, g, x)[0], grads(plain, g, x)[0])
    for stride in (1, 2):
        body = nn.Conv2d(4, 12, 3, stride, 1)
        tile = TileChannels(3, stride)
        x = torch.randn(2, 4, 8, 8, requires_grad=True)
        fast = Residual(body, tile)(x)
        plain = body(x) + tile(x)
        g = torch.randn_like(plain)
        assert torch.equal(fast, plain)
        for a, b in zip(grads(fast, g, x, body.weight), grads(plain, g, x, body.weight)):
            assert torch.equal(a, b)
