"""Multi-process training under `torchrun` (PyTorch DDP): process group, devices, the shared run folder.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (a submitit job of several tasks has them set from SLURM's
view by `adopt_submitit_tasks`); without them everything here is a no-op, so the same
`gan-train` command runs on one process or many. `trainer.batch_size` is the global batch: each of
the N processes trains on batch_size / N images per step, and DDP averages the gradients, so N
processes compute the same update as one process on the whole batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dcgan.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place in the job, from torchrun's environment variables."""
    return World(
        int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    )


def adopt_submitit_tasks() -> None:
    """In a submitit job of several tasks (SLURM, or submitit_local), one DDP process per task: set torchrun's
    variables (rank, world size, local rank, master address and port) from submitit's view of the job, so
    `world()` and `setup()` work as under torchrun. Nothing happens outside submitit or under torchrun."""
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit  # present whenever submitit launched us

    if submitit.JobEnvironment().num_tasks > 1:
        # CUDA_VISIBLE_DEVICES stays: setup() picks the GPU of LOCAL_RANK, as under torchrun.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def setup(device_setting: str, timeout_s: float) -> torch.device:
    """Join the process group (once) and return this process's device.

    NCCL for CUDA, gloo for CPU. The timeout bounds every collective: a dead or missing peer ends
    the job with an error instead of a silent hang.
    """
    w = world()
    device = resolve_device(device_setting, "trainer.device")
    cuda = device.type == "cuda"
    if w.enabled and cuda:
        device = torch.device("cuda", w.local_rank)  # one GPU per process, whatever cuda:N said
        torch.cuda.set_device(device)
    elif cuda and device.index is not None:
        # cuda:N alone: make it the current device before anything uses "the current one" (the side stream and
        # the capture of trainer.cuda_graphs, the random generators, cuDNN's handle).
        torch.cuda.set_device(device)
    if w.enabled and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if cuda else None,
        )
    return device


def object_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object, e.g. the run folder rank 0's Hydra chose)."""
    if not (world().enabled and dist.is_initialized()):
        return value
    chosen = [value]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def per_rank_batch(batch_size: int) -> int:
    size = world().size
    if batch_size % size:
        raise UserError(
            f"trainer.batch_size={batch_size} is the global batch and must divide evenly over {size} processes; "
            f"use a multiple of {size}"
        )
    return batch_size // size


def wrap(model: nn.Module, device: torch.device, sync_bn: bool) -> nn.Module:
    """DDP around a model when running distributed; the model itself otherwise."""
    if not world().enabled:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise UserError(
                "trainer.sync_bn=true needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); set it false on CPU"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def broadcast_buffers(*models: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), so the replicas are identical again."""
    if world().enabled:
        for model in models:
            for buffer in unwrap(model).buffers():
                dist.broadcast(buffer, src=0)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if world().enabled:
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (a CPU-GPU sync point)."""
    if not world().enabled:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


def from_main(value: float, device: torch.device) -> float:
    """Rank 0's value on every rank (a CPU-GPU sync point): decisions from a clock must be the same everywhere."""
    if not world().enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def replica_checksums(*models: nn.Module) -> List[float]:
    """Every rank's checksum of these models' weights and buffers (a CPU-GPU sync point).

    DDP keeps replicas identical by construction; this proves it at each checkpoint, and a drift
    (a non-deterministic kernel, a rank-dependent code path) stops the job instead of saving it.
    """
    tensors = [t.detach().double().flatten() for m in models for t in (*unwrap(m).parameters(), *unwrap(m).buffers())]
    flat = torch.cat(tensors) if tensors else torch.zeros(1, dtype=torch.double)
    # Position weights make the sum sensitive to which element changed, not only to the total.
    local = (flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.double, device=flat.device)).sum().reshape(1)
    if not world().enabled:
        return [local.item()]
    gathered = [torch.zeros_like(local) for _ in range(world().size)]
    dist.all_gather(gathered, local)
    checksums = [g.item() for g in gathered]
    if len(set(checksums)) != 1:
        raise RuntimeError(
            f"the ranks' model replicas differ (checksums {checksums}); not saving a checkpoint of one of them"
        )
    return checksums


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- devices

DEVICES_HELP = "auto, cpu, cuda or cuda:N"


def validate_device(key: str, device: str) -> None:
    if device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit()):
        return
    raise UserError(f"{key} must be {DEVICES_HELP}, got {device!r}")


def resolve_device(name: str, key: str = "device") -> torch.device:
    """auto | cpu | cuda | cuda:N as a torch.device; `key` names the setting in error messages."""
    validate_device(key, name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{key}={name} but CUDA is not available here; use {key}=cpu (or auto)")
    return torch.device(name)
