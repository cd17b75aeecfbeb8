"""Process-group helpers: one place decides rank, world size and which process writes files."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from labelenc.errors import UserError


def init_distributed(device: torch.device) -> None:
    """Join the process group started by ``torchrun`` (no-op for a single process); the process that joined calls
    :func:`shutdown_distributed` before it exits."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown_distributed() -> None:
    """Leave the process group (no-op without one). Left to interpreter exit, gloo's worker threads can outlive the
    interpreter and abort a process whose run had finished ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def local_device(requested: str) -> torch.device:
    """The device this process trains on; ``cuda`` on a machine without a GPU is a clear error."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda was requested but no CUDA device is available; use train.device=cpu")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # each process binds its own GPU (NCCL and default allocations use it)
        return device
    return torch.device("cpu")


def all_gather_objects(obj: object) -> list[object]:
    """Every process's ``obj`` (a list with one entry when not distributed)."""
    if get_world_size() == 1:
        return [obj]
    gathered: list[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    """Wait until every process gets here (e.g. before exiting, so the main one can finish writing a file)."""
    if get_world_size() > 1:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (or the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def any_process(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is true on any process: a decision every process must take alike (e.g. skipping a step,
    since one process skipping DDP's gradient all-reduce while another runs it would hang both)."""
    if get_world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def mean_over_processes(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each scalar averaged over the processes (logged losses), in one all-reduce."""
    if get_world_size() == 1 or not values:
        return values
    stacked = torch.stack([v.detach().float() for v in values])
    dist.all_reduce(stacked)
    return list(stacked / get_world_size())
