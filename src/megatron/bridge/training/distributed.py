"""The process group: created when `pretrain` starts, destroyed only if `pretrain` created it.

Outside `torchrun` the group has world size 1, so `torch.distributed.get_rank()` works inside
callbacks either way.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.bridge.training.config import DistributedInitConfig


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool
    """True when `pretrain` created the group (and so must destroy it)."""


def launched_world_size() -> int:
    """The world size torchrun announces (1 outside torchrun), known before any group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialize(config: DistributedInitConfig) -> DistributedContext:
    """Make sure a process group exists and pick this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    owns = False
    if not dist.is_initialized():
        backend = config.distributed_backend or ("nccl" if device.type == "cuda" else "gloo")
        timeout = datetime.timedelta(minutes=config.distributed_timeout_minutes)
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device if backend == "nccl" else None)
        else:
            # A single process needs no rendezvous: an in-memory store avoids claiming a port.
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    return DistributedContext(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device,
        owns_process_group=owns,
    )


def teardown(context: DistributedContext | None) -> None:
    """Destroy the process group if `initialize` created it."""
    if context is not None and context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
