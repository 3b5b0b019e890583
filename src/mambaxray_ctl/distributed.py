"""The few torch.distributed helpers the package needs; each is a no-op without a process group."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_rank() -> int:
    """This process's global rank: from the process group once initialised, else from the launcher's
    environment (``RANK``, ``SLURM_PROCID``), else 0. Usable before Lightning sets up DDP."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group).

    A collective: every rank must call it.
    """
    world = distributed_world()[1]
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered
