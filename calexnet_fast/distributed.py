"""Devices and ``torchrun`` process groups: where this process runs and which rank it is.

Everything that must behave differently under ``torchrun`` (one writer of a shared file, rank-sharded
batches, reduced metrics) asks :func:`dist_info`; outside ``torchrun`` every helper is a no-op for rank 0 of 1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "default_device", "dist_info", "init_distributed"]


def default_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when a GPU is visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a ``torchrun`` job (world_size 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """The current process group's rank and size (no group: rank 0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the ``torchrun`` process group if this process was started by one (``WORLD_SIZE`` > 1).

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when a GPU is visible, else gloo.

    Returns:
        The :class:`DistInfo`; a no-op returning rank 0 of 1 outside ``torchrun``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist_info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return dist_info()


def barrier() -> None:
    """Wait for every rank (no-op outside ``torchrun``)."""
    if dist_info().distributed:
        dist.barrier()


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks (unchanged outside ``torchrun``)."""
    if not dist_info().distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
