"""Several processes, one per GPU, started by torchrun: who am I, and the few collectives training needs.

Without torchrun's environment (WORLD_SIZE unset or 1) every function is a cheap no-op, so the
single-process path is the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from medseg.errors import ConfigError


@dataclass(frozen=True)
class Context:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics and the progress display."""
        return self.rank == 0


def check_batch(batch_size: int, world_size: int) -> None:
    """Each step's batch is split evenly over the processes: ConfigError where it cannot be."""
    if batch_size % world_size:
        raise ConfigError(f"'train.batch_size' {batch_size} must be divisible by the "
                          f"{world_size} processes it is split over")


def start(device: str) -> Context:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); no-op without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    context = Context(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(context.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return context


def stop(context: Context) -> None:
    """Leave the process group."""
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(context: Context, value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not context.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(context: Context, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not context.enabled:
        return [value]
    values: list[Any] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def all_true(context: Context, flag: torch.Tensor) -> bool:
    """Whether `flag` (a boolean tensor) holds on every rank."""
    if context.enabled:
        flag = flag.to(torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def any_true(context: Context, flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank."""
    if not context.enabled:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def maximum(context: Context, values: tuple[float, ...], device: torch.device) -> tuple[float, ...]:
    """The element-wise maximum of `values` over ranks (one collective for all of them)."""
    if not context.enabled:
        return tuple(values)
    tensor = torch.tensor(values, device=device, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tuple(tensor.tolist())


def mean(context: Context, value: float, device: torch.device) -> float:
    """The mean of `value` over ranks."""
    if not context.enabled:
        return value
    tensor = torch.tensor(float(value), device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / context.world_size
