"""`bitbench perf step`: training-step and eval-forward time of each method against `fp` on one architecture.

All models are built in one process and timed round-robin (every method once per repetition, after warm-up),
so load from other processes hits every method alike and the ratios to `fp` stay meaningful on a busy machine.
A step is forward, cross-entropy, backward and the stage's optimizer step; KD's teacher forward is not in it.
Each method is measured in the form it trains in: the hooks of its recipe's stages are applied in order up to
the middle stage among those that train binary weights (ReActNet: step 2; BiTAT: a middle progressive stage,
lower layers frozen binary, upper ones full precision). `calibrate` hooks (data-dependent initial values, such
as BiTAT's PCA) are not run: they change values, not the work a step does. The recipe family follows the input
(1 channel below 128 px: Fashion-MNIST's, 3 channels: CIFAR's, 128 px and above: ImageNet's). OpenMP
threads wait passively unless OMP_WAIT_POLICY says otherwise (`passive_omp_wait`).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmark.errors import BitbenchError
from benchmark.heap import OPT_OUT, keep_freed_memory

DEFAULT_ARCH = "resnet20"
PROC_STATUS = Path("/proc/self/status")


def passive_omp_wait() -> None:
    """Let idle OpenMP threads sleep instead of spin (OMP_WAIT_POLICY=PASSIVE) unless the environment says
    otherwise. With spinning threads on a CPU that other processes also use, every parallel op waits for a
    descheduled thread: a 2-thread resnet20 step measured 13x slower than a 1-thread one on a busy 2-core
    machine, and by amounts that differ per model. Only effective before torch is first imported."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=DEFAULT_ARCH, help=f"architecture (default {DEFAULT_ARCH})")
    parser.add_argument("--methods", nargs="+", metavar="METHOD[:VARIANT]",
                        help="methods to time (default: every registered method); fp is always added")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per method (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast around forward and loss")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: what `bitbench train` uses, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


@dataclass
class Subject:
    """One method's model in its training form, its optimizer, and the timings collected so far."""

    method: str
    variant: str
    stage: str
    model: Any
    optimizer: Any
    step_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    peak_step_bytes: int | None = None
    peak_eval_bytes: int | None = None


def parse_method(text: str) -> tuple[str, str | None]:
    """'name' or 'name:variant'."""
    name, _, variant = text.partition(":")
    return name, variant or None


def measured_stage(recipe, model) -> int:
    """Index of the stage the method is timed in: the middle one of the stages that train binary weights
    (after applying every earlier stage's hook, as a resumed run does); the middle stage if none does."""
    from baselines.layers import binary_layers

    training_binary = []
    for index, stage in enumerate(recipe.stages):
        if stage.apply is not None:
            stage.apply(model)
        if any(layer.binarize_weights and layer.weight.requires_grad for _, layer in binary_layers(model)):
            training_binary.append(index)
    candidates = training_binary or list(range(len(recipe.stages)))
    return candidates[len(candidates) // 2]


def build_subject(method: str, variant: str | None, arch: str, num_classes: int, in_channels: int,
                  image_size: int, dataset: str, device) -> Subject:
    """The method's model on `device` with the hooks of its recipe applied up to the measured stage."""
    import torch

    from benchmark.models import check_variant, create_model, get_method
    from benchmark.optim import build_optimizer
    from benchmark.runs import resolve_recipe

    spec = get_method(method)
    variant = check_variant(spec, variant)
    recipe = resolve_recipe(method, variant, dataset, {})
    probe = create_model(method, arch, num_classes, in_channels, image_size, variant)
    index = measured_stage(recipe, probe)
    del probe
    torch.manual_seed(0)
    model = create_model(method, arch, num_classes, in_channels, image_size, variant)
    for stage in recipe.stages[: index + 1]:
        if stage.apply is not None:
            stage.apply(model)
    model.to(device)
    stage = recipe.stages[index]
    return Subject(method, variant, stage.name, model, build_optimizer(model, stage.optim))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device, amp: bool):
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()


def train_step(subject: Subject, images, labels, amp: bool) -> None:
    """Forward, cross-entropy, backward, optimizer step (the engine's order)."""
    import torch.nn.functional as F

    subject.model.train()
    with _autocast(images.device, amp):
        logits = subject.model(images)
    loss = F.cross_entropy(logits.float(), labels)
    subject.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    subject.optimizer.step()


def eval_forward(subject: Subject, images, amp: bool) -> None:
    import torch

    subject.model.eval()
    with torch.no_grad(), _autocast(images.device, amp):
        subject.model(images)


def timed(fn: Callable[[], None], device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _proc_bytes(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", PROC_STATUS.read_text(), re.M)
    if match is None:
        raise BitbenchError(f"{PROC_STATUS} has no {key} line: CPU peak memory needs Linux")
    return int(match.group(1)) * 1024


def peak_bytes(fn: Callable[[], None], device) -> int | None:
    """Peak memory `fn` allocates above what was allocated before it.
    CUDA: torch.cuda.max_memory_allocated growth. CPU (Linux): growth of the resident set's high-water mark,
    reset through /proc/self/clear_refs after returning free heap pages with malloc_trim; None elsewhere."""
    import torch

    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not PROC_STATUS.is_file():
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    before = _proc_bytes("VmRSS")
    fn()
    return max(0, _proc_bytes("VmHWM") - before)


def measure(arch: str = DEFAULT_ARCH, methods: list[str] | None = None, batch_size: int = 128,
            image_size: int = 28, in_channels: int = 1, num_classes: int = 10, reps: int = 10, warmup: int = 2,
            device: str = "cpu", amp: bool = False, threads: int | None = None, seed: int = 0,
            memory: bool = True, progress: bool = False) -> dict[str, Any]:
    """Time every method round-robin; returns the settings and one row per method (fp first), ratios to fp.
    `memory=False` skips the peak-memory calls."""
    import torch
    from tqdm import tqdm

    from benchmark.models import check_arch, check_variant, get_method, list_methods

    check_arch(arch)
    for name, value in (("batch size", batch_size), ("image size", image_size), ("in channels", in_channels),
                        ("num classes", num_classes), ("reps", reps)):
        if value < 1:
            raise BitbenchError(f"{name} must be >= 1, got {value}")
    if warmup < 0:
        raise BitbenchError(f"warmup must be >= 0, got {warmup}")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise BitbenchError(f"unknown device {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BitbenchError("--device cuda asked for, but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise BitbenchError(f"device must be cpu or cuda, not {device!r}")
    heap_kept = dev.type == "cpu" and keep_freed_memory()  # as `bitbench train` runs on the CPU
    wanted = [parse_method(m) for m in (methods or [s.name for s in list_methods()])]
    if all(name != "fp" for name, _ in wanted):
        wanted.insert(0, ("fp", None))
    wanted.sort(key=lambda mv: mv[0] != "fp")  # fp first: the reference row
    for name, variant in wanted:
        check_variant(get_method(name), variant)  # bad names fail before any work
    if threads is not None:
        if threads < 1:
            raise BitbenchError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif dev.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))  # as `bitbench train` on one CPU process
    dataset = "fashion-mnist" if in_channels == 1 and image_size < 128 else "cifar10" if image_size < 128 \
        else "imagenet"
    subjects = [build_subject(name, variant, arch, num_classes, in_channels, image_size, dataset, dev)
                for name, variant in wanted]

    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, in_channels, image_size, image_size, generator=gen).to(dev)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(dev)
    for s in subjects:
        for _ in range(warmup):
            train_step(s, images, labels, amp)
            eval_forward(s, images, amp)
        if memory:
            s.peak_step_bytes = peak_bytes(lambda: train_step(s, images, labels, amp), dev)
            s.peak_eval_bytes = peak_bytes(lambda: eval_forward(s, images, amp), dev)
    if memory and dev.type == "cpu":
        for s in subjects:  # peak_bytes trimmed the heap: regrow it, so no timed step page-faults it back
            train_step(s, images, labels, amp)
            eval_forward(s, images, amp)
    for _ in tqdm(range(reps), desc=f"perf step {arch}", disable=not progress, leave=False):
        for s in subjects:  # round robin: each repetition times every method once
            s.step_s.append(timed(lambda: train_step(s, images, labels, amp), dev))
            s.eval_s.append(timed(lambda: eval_forward(s, images, amp), dev))

    fp_step = statistics.median(subjects[0].step_s)
    fp_eval = statistics.median(subjects[0].eval_s)
    rows = []
    for s in subjects:
        step, ev = statistics.median(s.step_s), statistics.median(s.eval_s)
        rows.append({
            "method": s.method, "variant": s.variant, "stage": s.stage,
            "step_ms": 1e3 * step, "step_vs_fp": step / fp_step,
            "eval_ms": 1e3 * ev, "eval_vs_fp": ev / fp_eval,
            "step_images_per_s": batch_size / step,
            "peak_step_mib": None if s.peak_step_bytes is None else s.peak_step_bytes / 2**20,
            "peak_eval_mib": None if s.peak_eval_bytes is None else s.peak_eval_bytes / 2**20,
        })
    return {
        "arch": arch, "batch_size": batch_size, "image_size": image_size, "in_channels": in_channels,
        "num_classes": num_classes, "device": _device_name(dev), "amp": amp, "threads": torch.get_num_threads(),
        "reps": reps, "warmup": warmup, "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "heap": f"glibc keeps freed memory ({OPT_OUT}=default: off)" if heap_kept else "default",
        "memory": "CUDA: max_memory_allocated growth over one call" if dev.type == "cuda" else
                  "CPU: resident-set high-water-mark growth over one call (after malloc_trim)",
        "rows": rows,
    }


def _device_name(dev) -> str:
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({os.cpu_count()} cores)"


def table(result: dict[str, Any]) -> str:
    """The rows as an aligned text table."""
    head = ["METHOD", "VARIANT", "STAGE", "STEP ms", "x FP", "EVAL ms", "x FP", "img/s", "PEAK STEP MiB"]
    lines = [head]
    for r in result["rows"]:
        peak = "-" if r["peak_step_mib"] is None else f"{r['peak_step_mib']:.0f}"
        lines.append([r["method"], r["variant"], r["stage"], f"{r['step_ms']:.1f}", f"{r['step_vs_fp']:.2f}",
                      f"{r['eval_ms']:.1f}", f"{r['eval_vs_fp']:.2f}", f"{r['step_images_per_s']:.0f}", peak])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def run(args: argparse.Namespace) -> int:
    passive_omp_wait()
    result = measure(args.arch, args.methods, args.batch_size, args.image_size, args.in_channels,
                     args.num_classes, args.reps, args.warmup, args.device, args.amp, args.threads, args.seed,
                     progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['arch']}  batch {result['batch_size']}  {result['in_channels']}x{result['image_size']}x"
          f"{result['image_size']}  {result['device']}  threads {result['threads']}  amp {result['amp']}  "
          f"median of {result['reps']} (interleaved, after {result['warmup']} warm-up)")
    print(table(result))
    return 0
