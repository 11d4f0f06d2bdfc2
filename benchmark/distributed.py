"""torch.distributed set-up from submitit's job environment or torchrun's variables; CPU uses gloo, CUDA nccl."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _in_submitit_job() -> bool:
    return "SUBMITIT_EXECUTOR" in os.environ or "SUBMITIT_LOCAL_JOB_ID" in os.environ or (
        "SLURM_JOB_ID" in os.environ and "SUBMITIT_FOLDER" in os.environ)


def setup() -> DistInfo:
    """Initialise the process group when more than one process takes part; return this process's place."""
    if _in_submitit_job() and "RANK" not in os.environ:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=torch.cuda.is_available(), overwrite=True)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # submitit's export narrows CUDA_VISIBLE_DEVICES to one GPU; under torchrun pick by local rank.
        index = local_rank if torch.cuda.device_count() > local_rank else 0
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few numbers over all ranks (evaluation counts); identity in a single process."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value of a small picklable object, on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gradient_probe(method: str, arch: str, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                   num_classes: int = 10) -> dict[str, torch.Tensor]:
    """Gradients of one step on a global batch, each rank taking its equal slice under DDP.

    Used to check that DDP gives the single-process gradient. BatchNorm runs in eval mode here, since per-rank
    batch statistics (the training default, as in torchvision's reference without --sync-bn) differ by design.
    """
    from benchmark.models import create_model

    info = setup()
    try:
        torch.manual_seed(seed)
        model = create_model(method, arch, num_classes=num_classes, in_channels=images.shape[1],
                             image_size=images.shape[-1]).eval()
        net = torch.nn.parallel.DistributedDataParallel(model) if info.enabled else model
        x = images.chunk(info.world_size)[info.rank]
        y = labels.chunk(info.world_size)[info.rank]
        torch.nn.functional.cross_entropy(net(x), y).backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        teardown()
